#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job: a chat answer from the built-in
# default model (SmolLM2-135M-Instruct, fetched once into ~/.cache/pagedllm) through LLM.chat. Extra args:
# the question.
# Each step says what it does as it starts and how long it took (scripts/steps.sh), on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/steps.sh
. scripts/steps.sh
start=$SECONDS
echo "==> setup (scripts/setup.sh; its log: $PAGEDLLM_STEP_LOG)" >&2
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
step "default model (SmolLM2-135M-Instruct, fetched once into ${PAGEDLLM_CACHE:-~/.cache/pagedllm})" \
  python -c "from pagedllm.default_model import default_model_path; print(default_model_path())"
echo "==> answer (load the model, then generate) ..." >&2
answer_start=$SECONDS
python - "$@" <<'PY'
import sys

from pagedllm import LLM

question = " ".join(sys.argv[1:]) or "What is the capital of France?"
llm = LLM()  # model=None: the built-in default model
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": question},
]
response = llm.chat(messages, use_tqdm=False)  # the model's own chat template, its default sampling
print(f"Q: {question}\nA: {response[0].message.content}")
PY
echo "    answer: done in $((SECONDS - answer_start))s (everything: $((SECONDS - start))s)" >&2
