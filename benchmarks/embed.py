"""Embedding throughput: all-MiniLM-L6-v2 on pagedllm (LLM.embed) and on sentence-transformers (encode), the
same short texts, in one run. Sentences per second for a batch of 1 text (latency-bound) and of 256 texts.

  python benchmarks/embed.py                 # CPU, 1 and 256 texts
  python benchmarks/embed.py --sizes 1 32 256 --repeats 5

Both sides: float32, the same weights, sentence-transformers with its default batch_size=32 (its usual
call) and with one batch of all texts; the faster of the two is the reference. The three take turns in
every repeat. Outputs are checked
equal (cosine >= 0.9999) before timing. Prints a table and one RESULT json line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

WORDS = ("the quick brown fox jumps over a lazy dog while engines serve embeddings for retrieval and "
         "rerankers score passages about cities rivers mountains music physics history").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(n)]


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds of each function; the functions take turns within every repeat, so a machine whose
    load changes during the run (shared by other jobs) weighs on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from pagedllm import LLM
    from pagedllm.pooling.minilm import minilm_path

    path = str(minilm_path())
    llm = LLM(path)
    st = SentenceTransformer(path, device="cpu")
    rows = []
    for n in args.sizes:
        batch = texts(n)
        ours = torch.tensor([o.outputs.embedding for o in llm.embed(batch, use_tqdm=False)])
        ref = st.encode(batch, convert_to_tensor=True).float()
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
        assert cos >= 0.9999, f"outputs differ: min cosine {cos}"
        t = timed({"ours": lambda: llm.embed(batch, use_tqdm=False),
                   "st32": lambda: st.encode(batch, batch_size=32),
                   "stall": lambda: st.encode(batch, batch_size=max(n, 1))}, args.repeats)
        t_ours, t_st32, t_stall = t["ours"], t["st32"], t["stall"]
        t_st = min(t_st32, t_stall)
        rows.append({"texts": n, "pagedllm_sent_s": n / t_ours, "st_sent_s": n / t_st,
                     "st_batch32_sent_s": n / t_st32, "st_batch_all_sent_s": n / t_stall,
                     "speedup": t_st / t_ours, "min_cosine": cos})
    print(f"{'texts':>6} {'pagedllm sent/s':>16} {'ST best sent/s':>15} {'ST bs32':>9} {'ST bs=all':>10} {'x':>6}")
    for r in rows:
        print(f"{r['texts']:>6} {r['pagedllm_sent_s']:>16.1f} {r['st_sent_s']:>15.1f} {r['st_batch32_sent_s']:>9.1f} "
              f"{r['st_batch_all_sent_s']:>10.1f} {r['speedup']:>6.2f}")
    print("RESULT " + json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
