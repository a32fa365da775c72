"""Ray is an optional extra: the core package and its one-engine server never import it, and `serve --replicas`
without it says how to install it. (Runs whether or not the extra is installed.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")


def test_the_core_and_its_server_do_not_import_ray():
    code = ("import sys, pagedllm, pagedllm.entrypoints.cli, pagedllm.entrypoints.openai.api_server, "
            "pagedllm.entrypoints.openai.serving_pooling, pagedllm.engine.async_engine; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": PYTHON_DIR})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_replicas_without_ray_names_the_extra():
    # ray made unimportable in a fresh interpreter: the CLI refuses with the install command, before any engine.
    code = ("import sys; sys.modules['ray'] = None; from pagedllm.entrypoints.cli import main; "
            "main(['serve', '/models/none', '--replicas', '2'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": PYTHON_DIR})
    assert out.returncode != 0
    assert "pip install pagedllm[ray]" in out.stderr and "--replicas" in out.stderr
