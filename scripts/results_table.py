"""Prints the RESULT rows of benchmarks/kernels/*.py (one JSON object a line) as a markdown table."""
import json
import sys


def fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    end_to_end = [r for r in rows if r.get("bench") == "throughput"]
    tensor_parallel = [r for r in rows if r.get("bench") == "tp"]
    rows = [r for r in rows if "op" in r]
    print("| op | shape | median us | GB/s | % copy BW | TFLOP/s | % matmul peak | x native |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['shape']} | {fmt(r.get('median_us'), '.1f')} | {fmt(r.get('gbps'), '.0f')} | "
              f"{fmt(r.get('pct_copy_bw'), '.1f')} | {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('pct_peak'), '.1f')} | "
              f"{fmt(r.get('speedup_vs_native'), '.2f')} |")
    if rows and "copy_gbps" in rows[0]:
        print(f"\ncopy bandwidth measured first: {rows[0]['copy_gbps']:.0f} GB/s")
    for r in end_to_end:
        floor = (f" (memory floor {r['floor_tok_s']:.0f} tok/s: {100 * r['pagedllm_tok_s'] / r['floor_tok_s']:.0f}%)"
                 if r.get("floor_tok_s") else "")
        hf = (f"; transformers {r['transformers_tok_s']:.0f} tok/s ({r['ratio']:.2f}x)"
              if r.get("transformers_tok_s") else "")
        print(f"end to end ({r['num_prompts']} prompts, concurrency {r['concurrency']}, {r['device']}): "
              f"{r['pagedllm_tok_s']:.0f} output tok/s{floor}{hf}")
    for r in tensor_parallel:
        sizes = ", ".join(f"TP={tp}: {v:.0f}" for tp, v in r["tok_per_s"].items())
        print(f"tensor parallel ({r['num_prompts']} prompts, {r['device']}): {sizes} output tok/s; "
              f"same first tokens: {r['same_first_tokens']}")


if __name__ == "__main__":
    main(sys.argv[1])
