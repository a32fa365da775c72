"""PEP 517 backend: setuptools, plus a build-time torch pinned to the torch that will run the wheel.

With build isolation pip builds in a fresh environment; an unpinned "torch" there could be any
release, and an extension built against one torch does not load in another. So we ask the
interpreter pip runs under (with the isolation's path tweaks removed) which torch it has, and
require exactly that version for the build.
"""
import os
import subprocess
import sys

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403 - re-export the standard hooks


def _runtime_torch_requirement():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                             env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return "torch"
    version = out.stdout.strip()
    return f"torch=={version.split('+')[0]}" if out.returncode == 0 and version else "torch"


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + [_runtime_torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + [_runtime_torch_requirement()]
