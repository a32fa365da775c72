"""Shared by the tensor-parallel tests: tiny random models whose heads split over 2 ranks, one
generation run, and the worker processes of an engine."""
from __future__ import annotations

from pathlib import Path

import os
import torch

VOCAB = 301  # odd: the last vocab shard is shorter than the others (padded logits)

# arch -> (query heads, KV heads): 1 KV head is replicated on both ranks, 2 are split.
SHAPES = {"llama": (2, 1), "mistral": (2, 1), "qwen2": (4, 2), "qwen3": (4, 2), "gpt2": (2, 2)}


def tiny_tp_config(arch: str):
    import transformers as tf

    heads, kv = SHAPES[arch]
    common = dict(vocab_size=VOCAB, hidden_size=64 * heads, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=2, rms_norm_eps=1e-5)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=8, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=64, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64 * heads, n_layer=2, n_head=heads, n_positions=256,
                             bos_token_id=0, eos_token_id=2)
    raise KeyError(arch)


def make_tp_model(root: Path, arch: str) -> Path:
    from transformers import AutoModelForCausalLM

    path = Path(root) / f"tp-{arch}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_tp_config(arch), dtype=torch.float32)
    with torch.no_grad():  # every parameter random (biases, norms): a wrong shard of any shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % (VOCAB - 5) + 3 for j in range(n)]}
           for i, n in enumerate((5, 19, 37))]


def engine_kwargs(**extra) -> dict:
    return dict(skip_tokenizer_init=True, kv_cache_space=0.01, max_model_len=128, seed=0, **extra)


def greedy(llm, max_tokens: int = 8, prompts=None):
    """(token ids, top-5 logprobs {token: value}) of each prompt, greedy, plus prompt logprobs."""
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    outs = llm.generate(PROMPTS if prompts is None else prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs],
             [{t: lp.logprob for t, lp in e.items()} for e in o.prompt_logprobs[1:]]) for o in outs]


def assert_close(got, want, tol: float = 2e-3) -> None:
    """Same tokens; logprobs within tol (the all-reduce sums the partial products in another order)."""
    for (g_ids, g_lp, g_plp), (w_ids, w_lp, w_plp) in zip(got, want):
        assert g_ids == w_ids
        for g, w in zip(g_lp + g_plp, w_lp + w_plp):
            assert g.keys() == w.keys()
            for t in w:
                assert abs(g[t] - w[t]) < tol, (t, g[t], w[t])


def alive(pid: int) -> bool:
    """pid is a running process (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_pids() -> list[int]:
    """This process's live children (from /proc: no psutil needed)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.append(int(entry))
    return out
