#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job: a chat answer from the built-in
# default model (SmolLM2-135M-Instruct, fetched once into ~/.cache/pagedllm) through LLM.chat. Extra args:
# the question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
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
