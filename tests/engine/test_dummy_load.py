"""load_format="dummy" + skip_tokenizer_init: a config-only folder runs (the GPU throughput setup)."""
import json

import pytest

from model_factory import tiny_config
from pagedllm import LLM, SamplingParams


def test_config_only_model_runs_on_token_ids(tmp_path):
    config = tiny_config("qwen3", 512).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, num_gpu_blocks_override=32,
              max_model_len=128, seed=0)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(3, 40))}],
                        SamplingParams(temperature=0.6, max_tokens=9, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 9]
    assert all(o.outputs[0].text == "" for o in outs)
    with pytest.raises(ValueError, match="TokensPrompt"):
        llm.generate(["text needs a tokenizer"], use_tqdm=False)
