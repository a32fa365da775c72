"""Accuracy of the opt-in int8 mode (quantization="gguf_int8") against the exact mode, on the default model
(or --model): on a fixed English paragraph (tests/data/fixed_paragraph.txt), teacher-forced, the fraction
of positions whose most likely next token is the same in both modes and each mode's perplexity; then
greedy continuations of a few prompts (tokens equal before the first divergence).

    python benchmarks/int8_accuracy.py [--model PATH] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fixed_paragraph.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are"]


def teacher_forced(llm, text: str) -> tuple[list[int], list[float]]:
    """(the most likely token before each position 1.., the logprob of the actual token there)."""
    from pagedllm import SamplingParams
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0), use_tqdm=False)[0]
    top1, actual = [], []
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
        actual.append(entry[token].logprob)
    return top1, actual


def compare(exact, int8, max_tokens: int) -> dict:
    from pagedllm import SamplingParams
    text = TEXT.read_text()
    top_e, lp_e = teacher_forced(exact, text)
    top_q, lp_q = teacher_forced(int8, text)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    greedy_e = [o.outputs[0].token_ids for o in exact.generate(PROMPTS, params, use_tqdm=False)]
    greedy_q = [o.outputs[0].token_ids for o in int8.generate(PROMPTS, params, use_tqdm=False)]
    same_prefix = [next((i for i, (a, b) in enumerate(zip(e, q)) if a != b), len(e)) for e, q in zip(greedy_e, greedy_q)]
    return {
        "positions": len(top_e),
        "top1_agreement": sum(a == b for a, b in zip(top_e, top_q)) / len(top_e),
        "perplexity_exact": math.exp(-sum(lp_e) / len(lp_e)),
        "perplexity_int8": math.exp(-sum(lp_q) / len(lp_q)),
        "greedy_tokens_equal_before_divergence": same_prefix,
        "greedy_max_tokens": max_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    from pagedllm import LLM
    common = dict(max_model_len=1024, kv_cache_space=0.25, seed=0)
    exact = LLM(args.model, **common)
    int8 = LLM(args.model, quantization="gguf_int8", **common)
    print(json.dumps(compare(exact, int8, args.max_tokens), indent=1))


if __name__ == "__main__":
    main()
