"""Online serving benchmark through the HTTP API (like `vllm bench serve`): N requests with random input and output
lengths, sent all at once or as Poisson arrivals at a given rate, each streamed (SSE) and timed on the client.

  # against a running server (pagedllm serve ... or any OpenAI-compatible one)
  python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
  # start `pagedllm serve` for the run (default model, CPU), then stop it
  python benchmarks/serve.py --launch "--device cpu --max-num-seqs 32" --num-prompts 32

Prompts are random token ids sent to /v1/completions (exact input lengths; --endpoint chat sends their decoded
text to /v1/chat/completions instead); outputs run to their drawn length (ignore_eos) and are counted from the
stream's usage. Reports request and token throughput, TTFT, TPOT (per-request mean time per output token after
the first) and ITL (gaps between stream chunks), mean / median / p99, and one RESULT json line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="server URL (default http://127.0.0.1:8000, or the launched one)")
    p.add_argument("--launch", default=None, metavar="SERVE_ARGS",
                   help="start `pagedllm serve SERVE_ARGS` on a free port for the run (e.g. \"--device cpu\")")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="model name in requests (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1: Poisson; <1 burstier, >1 more regular)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.5,
                   help="lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for one request")
    return p.parse_args(argv)


# --- workload ------------------------------------------------------------------------------------------

def draw_lengths(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def make_workload(args, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    low, high = min(100, vocab_size // 4), max(vocab_size - 100, vocab_size // 2)
    work = []
    for _ in range(args.num_prompts):
        n_in = draw_lengths(rng, args.random_input_len, args.random_range_ratio)
        n_out = draw_lengths(rng, args.random_output_len, args.random_range_ratio)
        work.append(([rng.randrange(low, high) for _ in range(n_in)], n_out))
    return work


async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yields 0..n-1 at Poisson (gamma) arrival times of the given mean rate; all at once when rate is inf."""
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            theta = 1.0 / (rate * burstiness)
            await asyncio.sleep(rng.gammavariate(burstiness, theta))


# --- one request ---------------------------------------------------------------------------------------

@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def one_request(client, args, model: str, prompt, max_tokens: int) -> Result:
    res = Result()
    body = {"model": model, "max_tokens": max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if args.endpoint == "completions":
        url, body["prompt"] = "/v1/completions", prompt
    else:
        url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                has_text = any((c.get("text") or (c.get("delta") or {}).get("content"))
                               for c in chunk.get("choices") or [])
                if has_text:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = last is not None
        if not res.ok:
            res.error = "no token came back"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


# --- the run -------------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run(args, base_url: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=args.timeout) as client:
        model = args.model
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        vocab = await _vocab_size(client, model)
        work = make_workload(args, vocab)
        prompts = [ids for ids, _ in work]
        if args.endpoint == "chat":
            prompts = [(await client.post("/detokenize", json={"model": model, "tokens": ids})).json()["prompt"]
                       for ids in prompts]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(i):
            if sem is None:
                return await one_request(client, args, model, prompts[i], work[i][1])
            async with sem:
                return await one_request(client, args, model, prompts[i], work[i][1])

        rng = random.Random(args.seed + 1)
        tasks = []
        start = time.perf_counter()
        async for i in arrivals(len(work), args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(limited(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, work, results, duration)


async def _vocab_size(client, model: str) -> int:
    """The largest token id the tokenizer knows, found by /detokenize bisection (the API has no vocab route)."""
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        r = await client.post("/detokenize", json={"model": model, "tokens": [mid - 1]})
        if r.status_code == 200:
            lo = mid
        else:
            hi = mid - 1
    return lo


def summarize(args, model: str, work, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    summary = {
        "model": model, "endpoint": args.endpoint, "num_prompts": len(work), "successful": len(ok),
        "failed": len(failed), "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "expected_output_tokens": sum(n for _, n in work),
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        summary[f"mean_{name}_ms"] = statistics.fmean(values) * 1000 if values else float("nan")
        summary[f"median_{name}_ms"] = _pct(values, 50) * 1000
        summary[f"p99_{name}_ms"] = _pct(values, 99) * 1000
    if failed:
        summary["first_error"] = failed[0].error
    return summary


def report(s: dict) -> None:
    line = "=" * 50
    print(f"{line}\n{' Serving Benchmark Result ':=^50}")
    rows = [("Successful requests", s["successful"]), ("Failed requests", s["failed"]),
            ("Request rate (req/s)", s["request_rate"]), ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", s["input_tokens"]), ("Total generated tokens", s["output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<36}{v:>14}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^50}")
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' ' + name.upper() + ' (ms)':<36}{s[f'{stat}_{name}_ms']:>14.2f}")
    print(line)
    if "first_error" in s:
        print("first error:", s["first_error"])
    print("RESULT " + json.dumps({"bench": "serve", **s}))


# --- launching a server for the run --------------------------------------------------------------------

def launch(serve_args: str):
    import shlex

    import httpx
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *shlex.split(serve_args),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    print("launching:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 15 minutes")
        time.sleep(0.5)


def main(argv=None) -> int:
    args = parse_args(argv)
    proc: Optional[subprocess.Popen] = None
    base_url = args.base_url or "http://127.0.0.1:8000"
    if args.launch is not None:
        proc, base_url = launch(args.launch)
    try:
        summary = asyncio.run(run(args, base_url))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    report(summary)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
