"""Greedy decoding with HF transformers, step by step on the full sequence (no cache, no padding):
the reference that the engine's tokens and logprobs must match."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_tokens: int, top_k: int = 5):
    """(generated token ids, per step [(token, logprob) top_k list])."""
    ids = list(prompt_ids)
    out, tops = [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, top_k)
        tops.append(list(zip(top.indices.tolist(), top.values.tolist())))
        tok = int(torch.argmax(logits))
        out.append(tok)
        ids.append(tok)
    return out, tops
