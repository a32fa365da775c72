"""Builds pagedllm._C by driving CMake + ninja.

Environment:
  PAGEDLLM_TARGET       auto (default) | cpu | cuda. auto builds the CUDA kernels when nvcc and a
                        CUDA build of torch are both present; cuda makes their absence an error.
  TORCH_CUDA_ARCH_LIST  e.g. "9.0" (default) or "8.0;9.0"; "+PTX" adds PTX for the last arch.
  MAX_JOBS              parallel compile jobs (default: all cores).
  CUDA_HOME             where nvcc lives (else PATH, else /usr/local/cuda).
  PAGEDLLM_CPU_ARCH     -march value for the CPU kernels (default: native).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def build_target(torch):
    target = os.environ.get("PAGEDLLM_TARGET", "auto").lower()
    if target not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"PAGEDLLM_TARGET must be auto, cpu or cuda, got {target!r}")
    if target == "cpu":
        return "cpu", None
    nvcc = find_nvcc()
    if target == "cuda" and (nvcc is None or torch.version.cuda is None):
        raise RuntimeError(
            f"PAGEDLLM_TARGET=cuda needs nvcc (found: {nvcc}) and a CUDA build of torch "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}); set CUDA_HOME")
    if nvcc and torch.version.cuda:
        return "cuda", nvcc
    return "cpu", None


def cuda_architectures():
    """TORCH_CUDA_ARCH_LIST ("9.0;8.0+PTX", "9.0a") -> CMAKE_CUDA_ARCHITECTURES ("90-real;80")."""
    archs = []
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        archs.append(num if ptx else f"{num}-real")
    return ";".join(archs)


def emu_cuda_include(nvcc, wheel_include):
    """CUDA headers for the emulator library _C_emu (csrc/cuda/emu): the toolkit's, else those of
    torch's nvidia wheels; empty (no _C_emu) when neither exists or PAGEDLLM_CUDA_EMU=0."""
    if os.environ.get("PAGEDLLM_CUDA_EMU", "1") == "0":
        return ""
    candidates = [Path(nvcc).parent.parent / "include"] if nvcc else []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidates.append(Path(home) / "include")
    candidates.append(wheel_include)
    for d in candidates:
        if (d / "cuda_bf16.h").exists() and (d / "driver_types.h").exists():
            return str(d)
    return ""


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        from torch.utils import cpp_extension

        target, nvcc = build_target(torch)
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(os.environ.get("PAGEDLLM_BUILD_DIR", ROOT / "build" / f"cmake-{target}")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_dir = Path(torch.__file__).parent
        cu_include = torch_dir.parent / "nvidia" / "cu13" / "include"
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PAGEDLLM_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPAGEDLLM_OUTPUT_DIR={out_dir}",
            f"-DPAGEDLLM_EXT_SUFFIX={self.get_ext_filename('_C')[len('_C'):]}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={torch_dir / 'lib'}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPAGEDLLM_CPU_ARCH={os.environ.get('PAGEDLLM_CPU_ARCH', 'native')}",
            f"-DPAGEDLLM_CUDA={'ON' if target == 'cuda' else 'OFF'}",
            f"-DPAGEDLLM_EMU_CUDA_INCLUDE={emu_cuda_include(nvcc, cu_include)}",
        ]
        if target == "cuda":
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()}",
                f"-DPAGEDLLM_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0')}",
                f"-DPAGEDLLM_EXTRA_CUDA_INCLUDE={cu_include if cu_include.exists() else ''}",
            ]
        if shutil.which("ninja") or _pip_ninja():
            args.append("-GNinja")
        ccache = shutil.which("ccache")
        if ccache and os.environ.get("PAGEDLLM_CCACHE", "1") == "1":
            args += [f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}"]
        cmake = shutil.which("cmake") or "cmake"
        print(f"pagedllm: building the {target} extension in {build_dir}", flush=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # Every target: _C and, where CUDA headers exist, the CUDA emulator library _C_emu.
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        self._emu_lib = out_dir / "_C_emu.so"

    def copy_extensions_to_source(self):
        """In-place and editable builds (`build_ext --inplace`, `pip install -e .`): setuptools builds into a
        temporary build-lib and copies the extensions it knows into the source tree. _C_emu is a plain torch
        op library (no Python module) that setuptools does not know: it is copied beside the package too."""
        super().copy_extensions_to_source()
        emu_lib = getattr(self, "_emu_lib", None)
        if emu_lib is not None and emu_lib.exists():
            shutil.copy2(emu_lib, ROOT / "python" / "pagedllm" / "_C_emu.so")


def _pip_ninja():
    try:
        import ninja  # noqa: F401 - the PyPI ninja puts its binary on PATH through a script
        return True
    except ImportError:
        return False


setup(ext_modules=[CMakeExtension("pagedllm._C")], cmdclass={"build_ext": CMakeBuild})
