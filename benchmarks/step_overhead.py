"""Host cost of a decode step at long contexts: a tiny random model (hidden 128, 2 layers) keeps the forward
small, so batch building and bookkeeping show. Median engine.step() over decode-only steps, CPU.
  python benchmarks/step_overhead.py --num-seqs 64 --context 2000 --steps 20
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_factory import make_tiny_model  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    path = make_tiny_model(Path(tempfile.mkdtemp()), "llama")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4 * args.context
    (path / "config.json").write_text(json.dumps(config))
    # Sequences admitted first decode while the later ones prefill (2048 tokens a step): they must not finish.
    max_tokens = -(-args.num_seqs * args.context // 2048) + args.steps + 8
    blocks = args.num_seqs * (-(-(args.context + max_tokens) // 16)) + 16
    llm = LLM(str(path), max_model_len=2 * args.context, num_gpu_blocks_override=blocks, max_num_seqs=args.num_seqs,
              enable_prefix_caching=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(str(i), {"prompt_token_ids": [(7 * i + j) % 250 + 3 for j in range(args.context)]}, params)
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    decoding = len(engine.scheduler.running)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"bench": "step_overhead", "num_seqs": args.num_seqs, "context": args.context,
                                  "decoding": decoding, "median_step_ms": 1e3 * statistics.median(times)}))


if __name__ == "__main__":
    main()
