#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job. Until the engine lands that is:
# what the build holds (python -m pagedllm.env) and one op on this machine's device against its
# plain-torch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pagedllm.env
python - <<'PY'
import torch
from pagedllm import _ops
from pagedllm.layers.rms_norm import RMSNorm

device = "cuda" if torch.cuda.is_available() else "cpu"
norm = RMSNorm(4096, eps=1e-6).to(device)
with torch.no_grad():
    norm.weight.normal_()
x = torch.randn(7, 4096, device=device)
out = norm.forward(x)
ref = norm.forward_native(x)
print(f"rms_norm on {device}: [7, 4096] fp32, max |kernel - plain torch| = {(out - ref).abs().max().item():.2e}")
PY
