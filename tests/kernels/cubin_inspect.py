"""What nvcc builds for sm_90, read without a GPU: compile the torch-free csrc/cuda/*_kernels.cu to
cubins, list every kernel instantiation with its registers, shared memory, stack and SASS opcodes
(cuobjdump from the PyPI wheel nvidia-cuda-cuobjdump), compute its occupancy as the CUDA occupancy
calculator does, and read the claims the kernel sources make about all of that in comments.

Claim comments (one line each, right above the kernel's `template <...>` / `__global__` lines):
  // occupancy(sm_90) if <cond>: >= <N> CTAs/SM of <threads> threads with <bytes> B dynamic smem
  // sass(sm_90) if <cond>: <OPCODE> [<OPCODE> ...]        (every listed opcode is in the SASS)
  // spills(sm_90) if <cond>: <= <bytes> B                 (a known, accepted spill; default 0)
<cond> is `all` or a Python expression over the kernel's template parameter names; a type
parameter is compared by name ('bf16', 'fp16', 'fp32'). An opcode matches the SASS mnemonic
itself or any mnemonic it is a dot-separated prefix of (LDG.E.128 matches LDG.E.128.CONSTANT).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
ARCH = "sm_90"

# sm_90 (H100) limits, as in CUDA's cuda_occupancy.h.
SMEM_PER_SM = 228 * 1024          # the largest carveout
SMEM_GRANULE = 128
SMEM_RESERVED_PER_CTA = 1024      # cudaDevAttrReservedSharedMemoryPerBlock
REGS_PER_SUBPARTITION = 65536 // 4
REG_GRANULE_PER_WARP = 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

_TYPE_NAMES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    candidates += sorted(Path("/usr/local").glob("cuda*/bin/nvcc"), reverse=True)
    return next((str(c) for c in candidates if c.exists()), None)


def find_cuda_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm: the PyPI wheel's copy (nvidia/cu13/bin), else next to nvcc, else PATH."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        for base in nvidia.__path__:
            for cand in sorted(Path(base).glob(f"cu*/bin/{name}"), reverse=True):
                return str(cand)
    except ImportError:
        pass
    nvcc = find_nvcc()
    if nvcc and (Path(nvcc).parent / name).exists():
        return str(Path(nvcc).parent / name)
    return shutil.which(name)


def kernel_sources() -> list[Path]:
    return sorted(CUDA_SRC.glob("*_kernels.cu"))


def _sources_digest(nvcc: str) -> str:
    h = hashlib.sha256(nvcc.encode())
    for p in sorted(CUDA_SRC.rglob("*")) + sorted((ROOT / "csrc" / "common").glob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def cmake_objects() -> dict[str, Path]:
    """The CMake CUDA build's objects of the *_kernels.cu files (each embeds its sm_90 cubin), when
    they are newer than every CUDA source: the same code, no second compile. {} when absent or stale."""
    build = Path(os.environ.get("PAGEDLLM_BUILD_DIR", ROOT / "build" / "cmake-cuda"))
    objects = {src.stem: build / "CMakeFiles" / "_C.dir" / "csrc" / "cuda" / f"{src.name}.o" for src in kernel_sources()}
    inputs = [p for p in list(CUDA_SRC.rglob("*")) + list((ROOT / "csrc" / "common").glob("*")) if p.is_file()]
    newest = max(p.stat().st_mtime for p in inputs)
    if all(o.exists() and o.stat().st_mtime >= newest for o in objects.values()):
        return objects
    return {}


def sm90_binaries() -> dict[str, Path]:
    """{stem: file holding its sm_90 cubin}: the CMake build's objects when fresh, else compile_cubins()."""
    return cmake_objects() or compile_cubins()


def compile_cubins(out_dir: Optional[Path] = None) -> dict[str, Path]:
    """nvcc -cubin -arch=sm_90 for every *_kernels.cu (in parallel), with the flags of the CMake build.
    Cached under build/sass-check/<hash of csrc/cuda and the nvcc path>; returns {stem: cubin}."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    out_dir = out_dir or ROOT / "build" / "sass-check" / _sources_digest(nvcc)
    out_dir.mkdir(parents=True, exist_ok=True)

    def build(src: Path) -> tuple[str, Path]:
        cubin = out_dir / f"{src.stem}.cubin"
        if not cubin.exists():
            tmp = cubin.with_suffix(f".tmp{os.getpid()}")
            cmd = [nvcc, "-cubin", f"-arch={ARCH}", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-lineinfo",
                   f"-I{ROOT / 'csrc'}", "-o", str(tmp), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
            tmp.replace(cubin)
        return src.stem, cubin

    jobs = max(1, min(len(kernel_sources()), os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(build, kernel_sources()))


@dataclass
class Kernel:
    mangled: str
    name: str                   # the function's own name, e.g. paged_attention_decode_kernel
    template_args: list[str]    # demangled, e.g. ['__nv_bfloat16', '128', '4']
    regs: int = 0
    static_smem: int = 0        # cuobjdump's SHARED (with the runtime's 1 KiB per CTA, when it uses smem)
    stack: int = 0
    local: int = 0
    opcodes: Counter = field(default_factory=Counter)

    @property
    def label(self) -> str:
        return f"{self.name}<{', '.join(self.template_args)}>"

    def has_opcode(self, opcode: str) -> bool:
        return any(op == opcode or op.startswith(opcode + ".") for op in self.opcodes)

    @property
    def smem_per_cta(self) -> int:
        """Static shared memory with the 1 KiB per CTA that sm_90's runtime always reserves (cuobjdump
        counts it in SHARED only for kernels that use shared memory)."""
        return self.static_smem if self.static_smem >= SMEM_RESERVED_PER_CTA else self.static_smem + SMEM_RESERVED_PER_CTA

    @property
    def spill_instructions(self) -> int:
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in ("LDL", "STL"))


def _split_template_args(s: str) -> list[str]:
    args, depth, cur = [], 0, ""
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        args.append(cur.strip())
    return args


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise FileNotFoundError("c++filt not found")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _parse_demangled(demangled: str) -> tuple[str, list[str]]:
    """'void ns::(anonymous namespace)::k<__half, ns::Vec16<__half>, 8>(__half*, ...)'
    -> ('k', ['__half', 'ns::Vec16<__half>', '8'])."""
    head = demangled[5:] if demangled.startswith("void ") else demangled
    depth = 0
    for i, ch in enumerate(head):  # cut at the parameter list: the first top-level '(' not in a namespace name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not head.startswith("(anonymous namespace)", i):
            head = head[:i]
            break
    lt = head.find("<")
    if lt < 0:
        return head.split("::")[-1], []
    return head[:lt].split("::")[-1], _split_template_args(head[lt + 1:head.rfind(">")])


_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_FUNCTION = re.compile(r"^\s+Function : (\S+)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def read_kernels(cubin: Path) -> list[Kernel]:
    """Every kernel of a cubin with its resource usage and SASS opcode counts."""
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    kernels: dict[str, Kernel] = {}
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in res.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = _RES.search(line)
        if m and current:
            regs, stack, shared, local = map(int, m.groups())
            kernels[current] = Kernel(current, "", [], regs, shared, stack, local)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1), "", []))
            continue
        m = _OPCODE.match(line)
        if m and current is not None:
            current.opcodes[m.group(1)] += 1
    for mangled, dem in _demangle(list(kernels)).items():
        kernels[mangled].name, kernels[mangled].template_args = _parse_demangled(dem)
    return list(kernels.values())


def ctas_per_sm(regs: int, threads: int, smem_bytes: int) -> int:
    """Resident CTAs per SM on sm_90 for a kernel of `regs` registers per thread, `threads` per CTA and
    `smem_bytes` shared memory per CTA (Kernel.smem_per_cta plus the dynamic size): the minimum of the register, shared-memory,
    warp and CTA limits, computed as CUDA's occupancy calculator does."""
    warps = -(-threads // 32)
    reg_per_warp = -(-max(regs, 1) * 32 // REG_GRANULE_PER_WARP) * REG_GRANULE_PER_WARP
    by_regs = (REGS_PER_SUBPARTITION // reg_per_warp) * 4 // warps
    smem = -(-smem_bytes // SMEM_GRANULE) * SMEM_GRANULE
    by_smem = SMEM_PER_SM // smem
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM)


# -- claims in the kernel sources -------------------------------------------------------------------
@dataclass
class Claim:
    kind: str               # occupancy | sass | spills
    kernel: str             # the __global__ function it is written above
    params: list[str]       # the kernel's template parameter names
    cond: str               # 'all' or a Python expression over params
    file: str
    line: int
    ctas: int = 0           # occupancy: at least this many CTAs per SM
    threads: int = 0
    dynamic_smem: int = 0
    opcodes: tuple = ()     # sass: every one of these is present
    spill_bytes: int = 0    # spills: at most this much stack

    def applies(self, kernel: Kernel) -> bool:
        if kernel.name != self.kernel:
            return False
        if self.cond.strip() == "all":
            return True
        if len(kernel.template_args) != len(self.params):
            raise ValueError(f"{self.file}:{self.line}: {kernel.label} does not match template <{self.params}>")
        env = {}
        for pname, value in zip(self.params, kernel.template_args):
            env[pname] = int(value) if re.fullmatch(r"-?\d+", value) else _TYPE_NAMES.get(value, value)
        return bool(eval(self.cond, {"__builtins__": {}}, env))  # conditions are our own source comments


_CLAIM = re.compile(r"^\s*//\s*(occupancy|sass|spills)\(sm_90\)\s+if\s+(.+?):\s*(.+?)\s*$")
_OCC = re.compile(r">=\s*(\d+)\s+CTAs/SM of\s+(\d+)\s+threads with\s+(\d+)\s+B dynamic smem")
_SPILL = re.compile(r"<=\s*(\d+)\s+B")
_TEMPLATE = re.compile(r"^\s*template\s*<(.*)>")


def _global_name(line: str) -> Optional[str]:
    """The function name of a `__global__ void [__launch_bounds__(...)] name(` line."""
    if "__global__" not in line:
        return None
    rest = line.split("__global__", 1)[1]
    lb = rest.find("__launch_bounds__(")
    if lb >= 0:  # skip the balanced parentheses of the launch bounds
        depth, i = 0, lb + len("__launch_bounds__")
        while i < len(rest):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
            if depth == 0:
                break
        rest = rest[i:]
    m = re.search(r"(\w+)\s*\(", rest)
    return m.group(1) if m else None


def read_claims(source: Path) -> list[Claim]:
    """The claim comments of one kernel source, each bound to the __global__ kernel right below it
    (only comments and its template line may come between)."""
    claims, pending, params = [], [], []
    lines = source.read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        m = _CLAIM.match(line)
        if m:
            pending.append((i, m.group(1), m.group(2), m.group(3)))
            continue
        stripped = line.strip()
        if not pending or not stripped or stripped.startswith("//"):
            continue
        t = _TEMPLATE.match(line)
        if t:
            params = [p.split()[-1] for p in _split_template_args(t.group(1))]
            if "__global__" not in line:
                continue
        name = _global_name(" ".join(lines[i - 1:i + 2]))  # the name may be on the next line
        if name is None:
            raise ValueError(f"{source.name}:{pending[0][0]}: a claim must sit right above its __global__ kernel")
        for lineno, kind, cond, body in pending:
            c = Claim(kind, name, params, cond, source.name, lineno)
            if kind == "occupancy":
                o = _OCC.search(body)
                if o is None:
                    raise ValueError(f"{source.name}:{lineno}: unreadable occupancy claim {body!r}")
                c.ctas, c.threads, c.dynamic_smem = map(int, o.groups())
            elif kind == "sass":
                c.opcodes = tuple(body.split())
            else:
                s = _SPILL.search(body)
                if s is None:
                    raise ValueError(f"{source.name}:{lineno}: unreadable spills claim {body!r}")
                c.spill_bytes = int(s.group(1))
            claims.append(c)
        pending, params = [], []
    if pending:
        raise ValueError(f"{source.name}:{pending[0][0]}: a claim with no kernel below it")
    return claims
