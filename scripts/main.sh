#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job: a chat answer from the built-in
# default model (SmolLM2-135M-Instruct, fetched once into ~/.cache/pagedllm). Extra args: the question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
python - "$@" <<'PY'
import sys

from pagedllm import LLM, SamplingParams

question = " ".join(sys.argv[1:]) or "What is the capital of France?"
llm = LLM()  # model=None: the built-in default model
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": question},
]
# The model's own chat template (from its GGUF metadata), applied by the tokenizer.
prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
output = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=128), use_tqdm=False)[0]
print(f"Q: {question}\nA: {output.outputs[0].text}")
PY
