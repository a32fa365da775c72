#!/usr/bin/env bash
# Sets up everything from the project's own files: .venv, torch, build and test deps, ccache,
# and the pagedllm._C extension (with its CUDA kernels when nvcc and a CUDA torch are present).
#   PAGEDLLM_TORCH   torch requirement (default torch==2.14.1: the CUDA 13.0 build, from local disk here)
#   PAGEDLLM_TARGET  auto | cpu | cuda (setup.py); CUDA_HOME defaults to /usr/local/cuda-13.0 when it exists
# Each step says what it does and how long it took (on stderr); pip's own output goes to a log
# (scripts/steps.sh) that is shown when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/steps.sh
. scripts/steps.sh

if [ ! -x .venv/bin/python ]; then
  step "virtual environment (.venv)" "${PYTHON:-python3}" -m venv .venv
else
  echo "==> virtual environment: .venv is there" >&2
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  step "torch (${PAGEDLLM_TORCH:-torch==2.14.1}, a large download the first time)" \
    pip install -q "${PAGEDLLM_TORCH:-torch==2.14.1}"
else
  echo "==> torch: installed" >&2
fi
# Build requirements come from pyproject.toml's [build-system] so that they are written down once.
mapfile -t build_reqs < <(python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))")
step "build requirements" pip install -q "${build_reqs[@]}"

if ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  step "ccache" bash -c "apt-get update -qq && apt-get install -y -qq ccache" \
    || echo "setup: ccache not installed (rebuilds will be slower)" >&2
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
export CCACHE_BASEDIR="$PWD"
step "build pagedllm._C and install pagedllm (minutes on a fresh clone, seconds after)" \
  pip install -q --no-build-isolation -e ".[test,ray]"
python -m pagedllm.env
