"""Where a decode step of the default model goes (CPU): --batch requests (1: batch-1 decode) of --prompt-len
random tokens, prefilled in one step (its time gives the prefill rate), then --steps decode steps; wall time
per decode step split into the decoder layers (the fused decoder_layers op), the LM head, the
sampler, the detokenizer and everything else (scheduler, block manager, batch building, Python), next to
the memory floor (the weight bytes a step streams plus its KV, over the copy bandwidth measured here).
Then a per-op profile of a few steps through the Python module loop (PAGEDLLM_CPU_FUSED_LAYERS=0).

    python benchmarks/decode_profile.py [--quantization gguf_int8] [--batch 1] [--steps 128] [--no-ops]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Timers:
    """Wraps callables so that their wall time adds up under a name."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(owner, attr, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-ops", action="store_true", help="skip the per-op profile")
    args = p.parse_args()
    from common import copy_bandwidth
    from throughput import streamed_weight_bytes

    from pagedllm import LLM, SamplingParams
    from pagedllm.engine import llm_engine as engine_mod
    from pagedllm.models import cpu_decoder_layers

    llm = LLM(args.model, max_model_len=1024, kv_cache_space=0.25, seed=0, quantization=args.quantization)
    engine = llm.llm_engine
    runner, model = engine.runner, engine.runner.model
    prompts = [{"prompt_token_ids": list(range(1000 + 7 * i, 1000 + 7 * i + args.prompt_len))} for i in range(args.batch)]
    prompt = prompts[0]
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up

    timers = Timers()
    timers.wrap(cpu_decoder_layers.CpuDecoderLayers, "__call__", "decoder layers (fused op)")
    timers.wrap(model, "compute_logits", "LM head")
    timers.wrap(engine.sampling, "finish", "sampler")  # the driver samples (engine/step_sampling.py)
    timers.wrap(engine_mod, "detokenize_incrementally", "detokenizer")
    step_times = []
    for i, pr in enumerate(prompts):
        engine.add_request(f"profile-{i}", pr, params)
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
        if len(step_times) == 1:  # the prefill step: not counted in the decode split
            timers.seconds.clear()
    decode = step_times[1:]  # the first step is the prefill (of every prompt: batch * prompt_len <= 2048 tokens)
    total = sum(decode)
    per_step = {k: v / len(decode) * 1e3 for k, v in timers.seconds.items()}
    per_step["other (scheduler, batch building, Python)"] = total / len(decode) * 1e3 - sum(per_step.values())
    bandwidth = copy_bandwidth("cpu")
    kv_per_token = runner.bytes_per_block // runner.block_size
    mean_ctx = args.batch * (args.prompt_len + args.steps / 2)
    step_bytes = streamed_weight_bytes(model) + kv_per_token * mean_ctx
    floor_ms = step_bytes / bandwidth * 1e3
    result = {"quantization": args.quantization, "batch": args.batch, "decode_steps": len(decode),
              "prefill_tokens": args.batch * args.prompt_len, "prefill_s": step_times[0],
              "prefill_tok_s": args.batch * args.prompt_len / step_times[0],
              "ms_per_step": total / len(decode) * 1e3, "decode_tok_s": args.batch * len(decode) / total,
              "split_ms_per_step": {k: round(v, 3) for k, v in per_step.items()},
              "streamed_mb_per_step": step_bytes / 1e6, "copy_gbps": bandwidth / 1e9,
              "memory_floor_ms": floor_ms, "memory_floor_tok_s": 1e3 / floor_ms,
              "share_of_floor": floor_ms / (total / len(decode) * 1e3)}
    print("RESULT " + json.dumps(result))
    if args.no_ops:
        return

    # per-op profile through the module loop: a few decode steps
    os.environ["PAGEDLLM_CPU_FUSED_LAYERS"] = "0"
    for i, pr in enumerate(prompts):  # the same batch as above
        engine.add_request(f"ops-{i}", pr, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()  # prefill
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    print(f"per-op, {steps} decode steps of {args.batch} through the module loop (self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
