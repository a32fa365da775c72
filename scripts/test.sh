#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ -n "${CUDA_HOME:-}" ] || [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  # The foundation's promise: a CUDA build of torch plus nvcc means the CUDA kernels were compiled.
  python -c "from pagedllm import _C, _ops; import torch, sys; sys.exit(0 if _C.cuda_compiled or torch.version.cuda is None else 'CUDA kernels were not compiled')"
  # ... and every CUDA kernel runs in the tests, through the CUDA emulator library (csrc/cuda/emu).
  python -c "from pagedllm import _ops; import sys; sys.exit(0 if _ops.cuda_emu_available() else 'the CUDA emulator library _C_emu was not built')"
fi
python -m pytest "$@"
