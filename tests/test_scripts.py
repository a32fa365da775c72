"""scripts/steps.sh, the progress helper of setup.sh and main.sh: each step is announced as it starts and timed;
the command's own output goes to the log, shown (its end) only when the step fails."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, log):
    return subprocess.run(["bash", "-c", f". scripts/steps.sh\n{script}"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PAGEDLLM_STEP_LOG": str(log)})


def test_a_step_is_announced_and_timed_and_its_noise_goes_to_the_log(tmp_path):
    log = tmp_path / "setup.log"
    r = _run('step "build things" bash -c "echo WARNING: pip noise; echo more noise >&2"\necho after', log)
    assert r.returncode == 0
    assert r.stderr.splitlines()[0] == "==> build things ..."
    assert r.stderr.splitlines()[1].startswith("    build things: done in ") and r.stderr.rstrip().endswith("s")
    assert "noise" not in r.stdout + r.stderr and r.stdout == "after\n"
    assert "WARNING: pip noise" in log.read_text() and "more noise" in log.read_text()


def test_a_failing_step_shows_the_end_of_its_log_and_fails(tmp_path):
    log = tmp_path / "setup.log"
    r = _run('set -e\nstep "fetch" bash -c "echo the real error >&2; exit 3"\necho unreachable', log)
    assert r.returncode == 3 and "unreachable" not in r.stdout
    assert "==> fetch FAILED after" in r.stderr and "(exit 3)" in r.stderr and "the real error" in r.stderr


def test_main_and_setup_announce_every_step():
    main = (ROOT / "scripts/main.sh").read_text()
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert ". scripts/steps.sh" in main and ". scripts/steps.sh" in setup
    for name in ("virtual environment", "torch", "build requirements", "build pagedllm._C"):
        assert f'step "{name}' in setup, name
    assert 'step "default model' in main and "==> answer" in main
