"""scripts/gpu_check.sh, checked without a GPU: its CUDA tests collect on an image without gguf, and the
script itself (run with nvidia-smi, pip, python's stages and timeout replaced by stubs that record their
calls) keeps every stage inside one deadline, leaves one archive of the logs plus the table, and prints
the table last."""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _cuda_tests() -> list[str]:
    m = re.search(r'^CUDA_TESTS="([^"]+)"', SCRIPT.read_text(), re.M)
    assert m, "gpu_check.sh names its CUDA tests in CUDA_TESTS"
    return m.group(1).split()


def test_cuda_tests_exist_and_collect_without_gguf():
    paths = _cuda_tests()
    assert all((ROOT / p).exists() for p in paths), paths
    # gguf made unimportable, as on the GPU image; then collect exactly what gpu_check.sh runs.
    code = ("import sys, pytest; sys.modules['gguf'] = None; "
            f"sys.exit(pytest.main(['--collect-only', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', *{paths!r}]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error" not in res.stdout.lower().split("\n")[-2], res.stdout[-2000:]
    collected = [line for line in res.stdout.splitlines() if "::" in line]
    assert any("test_attention_decode" in c for c in collected) and any("test_cuda_graph" in c for c in collected)


_STUB_PYTHON = """#!/usr/bin/env bash
# python for gpu_check.sh's stages: records the call; the table and the import checks run for real.
echo "python $*" >>"$CALLS"
case "$1" in
  scripts/results_table.py|-c) exec "$REAL_PYTHON" "$@" ;;
  -m) [ "$2" = pytest ] && echo "3 passed" ; exit 0 ;;
  benchmarks/kernels/*) echo 'RESULT {"op": "'"$(basename "$1" .py)"'", "shape": "s", "median_us": 1.5}' ;;
esac
exit 0
"""


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


def test_gpu_check_keeps_one_deadline_one_archive_and_prints_the_table_last(tmp_path):
    bin_dir, out, calls = tmp_path / "bin", tmp_path / "out", tmp_path / "calls.txt"
    bin_dir.mkdir()
    _stub(bin_dir, "python", _STUB_PYTHON)
    _stub(bin_dir, "nvidia-smi", "#!/usr/bin/env bash\necho 'Fake GPU, 81559 MiB, 1980 MHz'\n")
    _stub(bin_dir, "pip", '#!/usr/bin/env bash\necho "pip $*" >>"$CALLS"\n'
                          'echo "ptxas info    : Used 40 registers"\n')
    _stub(bin_dir, "timeout", '#!/usr/bin/env bash\necho "timeout $1" >>"$CALLS"\nshift\nexec "$@"\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "CALLS": str(calls), "REAL_PYTHON": sys.executable, "GPU_CHECK_DEADLINE": "400"}
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr

    # Every stage ran under a timeout within the deadline less the reserve; the pytest stage ran -m cuda
    # on exactly CUDA_TESTS.
    lines = calls.read_text().splitlines()
    limits = [int(line.split()[1]) for line in lines if line.startswith("timeout ")]
    assert limits and max(limits) <= 400 - 20
    assert f"python -m pytest -m cuda {' '.join(_cuda_tests())} -q -x -p no:cacheprovider" in lines
    benches = sorted(p.stem for p in (ROOT / "benchmarks" / "kernels").glob("bench_*.py"))
    assert sum(1 for line in lines if line.startswith("python benchmarks/kernels/")) == len(benches)

    # What comes back: one archive with every log, and the table.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tar.gz", "table.md"]
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "tests.log", "throughput.log", "device.txt"} <= names
    assert {f"{b}.log" for b in benches} <= names
    # The table is the last thing printed, one row per benchmark.
    table = (out / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(benches)
    assert res.stdout.strip().splitlines()[-len(table):] == table
