#!/usr/bin/env bash
# Sets up everything from the project's own files: .venv, torch, build and test deps, ccache,
# and the pagedllm._C extension (with its CUDA kernels when nvcc and a CUDA torch are present).
#   PAGEDLLM_TORCH   torch requirement (default torch==2.14.1: the CUDA 13.0 build, from local disk here)
#   PAGEDLLM_TARGET  auto | cpu | cuda (setup.py); CUDA_HOME defaults to /usr/local/cuda-13.0 when it exists
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

python -c "import torch" 2>/dev/null || pip install -q "${PAGEDLLM_TORCH:-torch==2.14.1}"
# Build requirements come from pyproject.toml's [build-system] so that they are written down once.
mapfile -t build_reqs < <(python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))")
pip install -q "${build_reqs[@]}"

if ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1 || echo "setup: ccache not installed (rebuilds will be slower)"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
export CCACHE_BASEDIR="$PWD"
pip install -q --no-build-isolation -e ".[test]"
python -m pagedllm.env
