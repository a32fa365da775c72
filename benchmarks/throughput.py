"""Offline throughput: the nano-vllm workload (random-token prompts of random length, random
max_tokens, ignore_eos), on pagedllm and on transformers' generate over the same prompts.

  python benchmarks/throughput.py                       # default model, CPU, 32 prompts at concurrency 32
  python benchmarks/throughput.py --num-prompts 4 --concurrency 1
  python benchmarks/throughput.py --device cuda --model benchmarks/configs/qwen3-0.6b --load-format dummy \
      --num-prompts 256 --concurrency 256 --min-input 100 --max-input 1024 --min-output 100 --max-output 1024 \
      --temperature 0.6 --max-model-len 4096 --skip-hf      # issue 5's workload (random bf16 weights)

Prints output tokens/s for both and their ratio, and one RESULT json line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf, hub id; default: the built-in model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32, help="max_num_seqs (and transformers' batch size)")
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=128)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--quantization", default=None, help="gguf_int8: the opt-in int8 mode")
    p.add_argument("--load-format", default="auto",
                   help="dummy: random weights from the model folder's config.json, no tokenizer needed "
                        "(e.g. --model benchmarks/configs/qwen3-0.6b)")
    return p.parse_args()


def workload(args, vocab_size: int):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(args.min_input, args.max_input))]
               for _ in range(args.num_prompts)]
    outputs = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_prompts)]
    return prompts, outputs


def run_pagedllm(args, prompts, out_lens):
    from pagedllm import LLM, SamplingParams
    kwargs = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.concurrency, seed=args.seed,
                  enforce_eager=args.enforce_eager, quantization=args.quantization)
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.load_format == "dummy":
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    llm = LLM(args.model, **kwargs)
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True, seed=i)
              for i, n in enumerate(out_lens)]
    # Warm-up (allocator, kernels, graphs) on a couple of short requests.
    llm.generate([{"prompt_token_ids": p[:16]} for p in prompts[:2]], [params[0], params[1]], use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), "ignore_eos requests must produce exactly max_tokens"
    return produced / seconds, seconds, llm


def decode_floor_seconds(prompt_lens, out_lens, concurrency, weight_bytes, kv_bytes_per_token, bandwidth):
    """The memory floor of the decode steps: each step reads every weight once and the KV of every running
    sequence, at the measured copy bandwidth. Requests run FCFS in `concurrency` slots, one token per step;
    prefills (compute-bound) are not counted."""
    waiting = list(zip(prompt_lens, out_lens))[::-1]
    running, seconds = [], 0.0  # running: [context length, tokens left]
    while waiting or running:
        while waiting and len(running) < concurrency:
            p, n = waiting.pop()
            running.append([p, n])
        seconds += (weight_bytes + kv_bytes_per_token * sum(c for c, _ in running)) / bandwidth
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]
    return seconds


def streamed_weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: every parameter except an untied input embedding (only
    the step's rows of it are read), and for a layer the CPU serves from packed GGUF codes
    (layers/linear.py), its codes instead of its fp32 weight."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    head = getattr(model, "lm_head", None)
    embed = next((m for m in model.modules() if type(m).__name__ == "VocabEmbedding"), None)
    if embed is not None and not getattr(head, "tied", False):
        total -= embed.weight.numel() * embed.weight.element_size()
    for m in model.modules():
        packed = getattr(m, "packed", None)
        if packed is not None and packed.qtype:
            weight = m.head_weight if hasattr(m, "head_weight") else m.weight
            total += packed.nbytes - weight.numel() * weight.element_size()
    return total


def compute_floor_seconds(model, prompt_lens, out_lens, peak_flops) -> float:
    """The GEMM floor of the workload: every prompt token and every fed-back output token through each
    linear layer, one LM-head row per output token, at the matmul peak; attention FLOPs not counted."""
    from pagedllm.layers.linear import LMHead, Linear
    layers = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))
    head = sum(m.head_weight.numel() for m in model.modules() if isinstance(m, LMHead))
    tokens = sum(prompt_lens) + sum(out_lens) - len(out_lens)
    return (2 * layers * tokens + 2 * head * sum(out_lens)) / peak_flops


def run_transformers(args, prompts, out_lens, hf_config, dtype):
    """transformers' generate in batches of --concurrency, left-padded; a batch runs to its longest
    max_tokens, and only the requested tokens are counted."""
    from pagedllm.models import loader
    if args.load_format == "dummy":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model = model.to(args.device).eval()
    else:
        model = loader.load_hf_reference(args.model, dtype, args.device)
    pad = 0
    t0 = time.perf_counter()
    produced = 0
    for start in range(0, len(prompts), args.concurrency):
        batch = prompts[start:start + args.concurrency]
        lens = out_lens[start:start + args.concurrency]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        with torch.inference_mode():
            kwargs = dict(do_sample=args.temperature > 0, max_new_tokens=max(lens), min_new_tokens=max(lens),
                          pad_token_id=pad)
            if args.temperature > 0:
                kwargs["temperature"] = args.temperature
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        produced += sum(lens)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return produced / seconds, seconds


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    from pagedllm.models import loader
    vocab = loader.load_config(loader.resolve_model(args.model)).vocab_size
    prompts, out_lens = workload(args, vocab)
    tps, seconds, llm = run_pagedllm(args, prompts, out_lens)
    total_out = sum(out_lens)
    print(f"pagedllm:     {total_out} output tokens in {seconds:.2f} s = {tps:.1f} tok/s "
          f"({args.num_prompts} prompts, concurrency {args.concurrency}, {args.device}, torch threads "
          f"{torch.get_num_threads()})")
    row = {"bench": "throughput", "device": args.device, "num_prompts": args.num_prompts,
           "concurrency": args.concurrency, "pagedllm_tok_s": tps, "output_tokens": total_out}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
    from common import copy_bandwidth, matmul_peak_flops
    runner = llm.llm_engine.runner
    bandwidth = copy_bandwidth(args.device)
    floor = decode_floor_seconds([len(p) for p in prompts], out_lens, args.concurrency,
                                 streamed_weight_bytes(runner.model), runner.bytes_per_block // runner.block_size,
                                 bandwidth)
    print(f"memory floor: {total_out / floor:.1f} tok/s (weights + KV of each decode step over the {bandwidth / 1e9:.0f} "
          f"GB/s copy bandwidth, {floor:.2f} s; prefills not counted): pagedllm at {100 * floor / seconds:.0f}%")
    row.update(floor_tok_s=total_out / floor, copy_gbps=bandwidth / 1e9)
    peak = matmul_peak_flops(args.device, llm.llm_engine.dtype)
    compute = compute_floor_seconds(runner.model, [len(p) for p in prompts], out_lens, peak)
    print(f"compute floor: {total_out / compute:.1f} tok/s (the GEMM FLOPs of every token at the {peak / 1e9:.0f} "
          f"GFLOP/s of a torch matmul, {compute:.2f} s; attention not counted): pagedllm at {100 * compute / seconds:.0f}%")
    row.update(compute_floor_tok_s=total_out / compute, matmul_gflops=peak / 1e9)
    if not args.skip_hf:
        hf_config, dtype = llm.llm_engine.hf_config, llm.llm_engine.dtype
        del llm, runner  # on a GPU the engine's KV cache would leave transformers no memory
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        hf_tps, hf_seconds = run_transformers(args, prompts, out_lens, hf_config, dtype)
        print(f"transformers: {total_out} output tokens in {hf_seconds:.2f} s = {hf_tps:.1f} tok/s")
        print(f"ratio pagedllm / transformers: {tps / hf_tps:.2f}x")
        row.update(transformers_tok_s=hf_tps, ratio=tps / hf_tps)
    print("RESULT " + json.dumps(row))


if __name__ == "__main__":
    main()
