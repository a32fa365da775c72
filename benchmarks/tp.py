"""Tensor parallelism on this machine: the same offline workload at tensor_parallel_size 1 and N
(gloo on the CPU, "mp" workers; NCCL on CUDA), greedy, ignore_eos. Checks first that both give the same
tokens for the first prompts, then times each.

  python benchmarks/tp.py                                   # default model, CPU, TP 1 vs 2
  python benchmarks/tp.py --device cuda --model benchmarks/configs/qwen3-0.6b --load-format dummy \\
      --tp 1 2 4 --num-prompts 256 --max-output 256         # the multi-GPU recipe (scripts/gpu_check.sh)

On the CPU the ranks share the host's cores (each takes cpu_count / N threads), so TP cannot add
compute: it only splits the weight stream, at the price of two all-reduces a layer. Prints tokens/s per
TP size and one RESULT json line.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf, hub id; default: the built-in model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backend", default="mp", choices=["mp", "ray"])
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=128)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from pagedllm import LLM, SamplingParams

    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(rng.randint(args.min_input,
                                                                                          args.max_input))]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_output, ignore_eos=True)
    results, first_tokens = {}, {}
    for tp in args.tp:
        llm = LLM(args.model, device=args.device, load_format=args.load_format, max_model_len=args.max_model_len,
                  tensor_parallel_size=tp, distributed_executor_backend=args.backend if tp > 1 else None,
                  skip_tokenizer_init=True, max_num_seqs=args.num_prompts, seed=args.seed)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        first_tokens[tp] = [o.outputs[0].token_ids[:8] for o in outs[:4]]
        results[tp] = tokens / seconds
        print(f"TP={tp}: {tokens} tokens in {seconds:.2f} s = {results[tp]:.1f} tok/s", flush=True)
        llm.llm_engine.shutdown()
        del llm
        gc.collect()
    same = all(first_tokens[tp] == first_tokens[args.tp[0]] for tp in args.tp)
    print(f"first tokens equal across TP sizes: {same}")
    print("RESULT " + json.dumps({"bench": "tp", "tok_per_s": results, "same_first_tokens": same, "device": args.device,
                                  "num_prompts": args.num_prompts, "max_output": args.max_output}))


if __name__ == "__main__":
    main()
