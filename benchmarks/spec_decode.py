"""Speculative decoding and beam search on the default model (not a test: prints figures for RESULTS.md).

  python benchmarks/spec_decode.py                    # ngram on/off, batch 1 and 8, a repetitive and a plain task
  python benchmarks/spec_decode.py --skip-spec        # only beam search width 4 vs transformers
  python benchmarks/spec_decode.py --skip-beam

Repetitive task: the chat model is asked to repeat a given paragraph (its answer copies the prompt, which
is what prompt lookup proposes). Plain task: open-ended questions. Greedy, the same prompts for every
configuration; tok/s = generated tokens / wall time of the whole batch; acceptance = accepted / proposed.
Both engines (speculation off and on) stay loaded and each (task, batch) runs off and on back to back,
--repeats times (alternating which goes first), so a shared machine's changing load hits both alike;
the ratio on / off of each pair, their median and the load average are printed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

PARAGRAPH = ("The city council met on Tuesday to discuss the new budget. The mayor proposed to spend more on "
             "public transport, parks and schools, and less on roads. Several members asked how the plan would "
             "be paid for, and the finance director explained that the money would come from a small increase "
             "in parking fees and from savings in the administration.")
REPETITIVE = [f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
              f"Copy this paragraph, changing nothing:\n\n{PARAGRAPH}"]
PLAIN = ["Write a short story about a dragon who learns to bake bread.",
         "Explain how a bicycle works to a ten-year-old."]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="off/on pairs per (task, batch)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--beam-tokens", type=int, default=32)
    p.add_argument("--skip-spec", action="store_true")
    p.add_argument("--skip-beam", action="store_true")
    return p.parse_args()


def _chat_prompts(tok, texts: list[str], batch: int) -> list[str]:
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts]
    return [rendered[i % len(rendered)] for i in range(batch)]


def _run_once(llm, prompts, params) -> tuple[int, float, tuple[int, int]]:
    """(generated tokens, seconds, (draft tokens, accepted tokens) of this run)."""
    stats = llm.llm_engine.stats.get("spec_decode")
    before = (stats.num_draft_tokens, stats.num_accepted_tokens) if stats else (0, 0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    after = (stats.num_draft_tokens, stats.num_accepted_tokens) if stats else (0, 0)
    return sum(len(o.outputs[0].token_ids) for o in outs), dt, (after[0] - before[0], after[1] - before[1])


def bench_spec(args) -> list[dict]:
    from pagedllm import LLM, SamplingParams
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
             "prompt_lookup_min": args.lookup_min}
    engines = {"off": LLM(max_model_len=1024, enable_prefix_caching=False),
               "ngram": LLM(max_model_len=1024, speculative_config=ngram, enable_prefix_caching=False)}
    tok = engines["off"].get_tokenizer()
    for llm in engines.values():
        llm.generate(_chat_prompts(tok, PLAIN, 1), SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    for task, texts in (("repetitive", REPETITIVE), ("plain", PLAIN)):
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = _chat_prompts(tok, texts, batch)
            ratios, speeds, drafted, accepted = [], {"off": [], "ngram": []}, 0, 0
            load = os.getloadavg()[0]
            for r in range(args.repeats):
                order = ("off", "ngram") if r % 2 == 0 else ("ngram", "off")
                pair = {}
                for name in order:
                    n, dt, (d, a) = _run_once(engines[name], prompts, params)
                    pair[name] = n / dt
                    speeds[name].append(round(n / dt, 1))
                    drafted, accepted = drafted + d, accepted + a
                ratios.append(round(pair["ngram"] / pair["off"], 3))
            row = {"task": task, "batch": batch, "tok_per_s_off": speeds["off"], "tok_per_s_on": speeds["ngram"],
                   "ratios_on_off": ratios, "median_ratio": round(statistics.median(ratios), 3),
                   "acceptance": round(accepted / drafted, 3) if drafted else None, "draft_tokens": drafted,
                   "load_avg_1min": [round(load, 1), round(os.getloadavg()[0], 1)],
                   # what the speculator learned: a step's fixed cost in tokens' worth (cost_model.py)
                   "fixed_cost_tokens": round(engines["ngram"].llm_engine.speculator.cost.fixed_tokens, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    del engines
    gc.collect()
    return rows


def bench_beam(args) -> dict:
    from pagedllm import LLM
    from pagedllm.models.loader import load_hf_reference
    from pagedllm.sampling_params import BeamSearchParams
    llm = LLM(max_model_len=1024)
    tok = llm.get_tokenizer()
    prompt = _chat_prompts(tok, PLAIN[:1], 1)[0]
    ids = tok.encode(prompt)
    params = BeamSearchParams(beam_width=4, max_tokens=args.beam_tokens, ignore_eos=True)
    llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=4, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    ours = llm.beam_search([{"prompt_token_ids": ids}], params)[0]
    t_ours = time.perf_counter() - t0
    del llm
    gc.collect()
    hf = load_hf_reference(None)
    with torch.inference_mode():
        x = torch.tensor([ids])
        hf.generate(x, attention_mask=torch.ones_like(x), num_beams=4, do_sample=False, max_new_tokens=4,
                    min_new_tokens=4, pad_token_id=tok.eos_token_id)
        t0 = time.perf_counter()
        ref = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=4, do_sample=False,
                          max_new_tokens=args.beam_tokens, min_new_tokens=args.beam_tokens,
                          pad_token_id=tok.eos_token_id)
        t_hf = time.perf_counter() - t0
    same = ours.sequences[0].tokens == ref[0].tolist()
    row = {"beam_width": 4, "max_tokens": args.beam_tokens, "pagedllm_s": round(t_ours, 2),
           "transformers_s": round(t_hf, 2), "speedup": round(t_hf / t_ours, 2), "same_best_beam": same}
    print(json.dumps(row), flush=True)
    return row


def main():
    args = parse_args()
    torch.manual_seed(0)
    if not args.skip_spec:
        bench_spec(args)
    if not args.skip_beam:
        bench_beam(args)


if __name__ == "__main__":
    main()
