"""Where the time of LLM.embed goes: torch.profiler's per-op self CPU time for one batch of short texts
(all-MiniLM-L6-v2, the texts of benchmarks/embed.py), after a warm-up call.

  python benchmarks/embed_profile.py                # 256 texts, top 15 ops
  python benchmarks/embed_profile.py --texts 1 --rows 25
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from embed import texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--rows", type=int, default=15, help="ops listed")
    args = p.parse_args()

    from pagedllm import LLM
    from pagedllm.pooling.minilm import minilm_path

    llm = LLM(str(minilm_path()))
    batch = texts(args.texts)
    llm.embed(batch, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.embed(batch, use_tqdm=False)
    print(f"{args.texts} texts: {time.perf_counter() - t0:.3f} s unprofiled")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.embed(batch, use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
