"""Structured outputs: throughput of 32 concurrent requests with a JSON schema vs the same requests
without one (one engine, one run), and grammar compile time cold and cached.

  python benchmarks/structured.py                      # default model, CPU, 32 requests
  python benchmarks/structured.py --num-prompts 8 --max-tokens 64

Throughput is output tokens / wall time of the whole batch. The unconstrained run uses ignore_eos so
its requests run their full max_tokens (the constrained ones end when the JSON does): tokens/s is the
comparable figure. Prints a table and one RESULT json line.
"""
from __future__ import annotations

import argparse
import json
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "skills", "address"],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile-only", action="store_true", help="only the compile times")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    llm = LLM(args.model, device=args.device, max_model_len=1024, max_num_seqs=args.num_prompts,
              structured_outputs_config={"backend": args.backend})
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Describe person number {i} as JSON."}],
                                       tokenize=False, add_generation_prompt=True) for i in range(args.num_prompts)]
    manager = llm.llm_engine.admission.manager

    # Compile time: backend set-up (tokenizer tables, once per engine), a cold compile, a cached one.
    so = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    manager.validate(so)
    t1 = time.perf_counter()
    manager.compile_async(so).result()
    t2 = time.perf_counter()
    again = StructuredOutputsParams(json=json.dumps(SCHEMA))  # the same spec, as another request sends it
    manager.validate(again)
    t3a = time.perf_counter()
    manager.compile_async(again).result()  # the cache
    t3 = time.perf_counter()
    if args.compile_only:
        print(f"backend set-up {t1 - t0:.3f} s, cold compile {t2 - t1:.3f} s, cached {1e3 * (t3 - t3a):.3f} ms "
              f"(its validation {1e3 * (t3a - t2):.1f} ms)")
        return

    llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up

    def run(params):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return outs, tokens, seconds

    free_params = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
                   for i in range(args.num_prompts)]
    json_params = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                  structured_outputs=StructuredOutputsParams(json=SCHEMA))
                   for i in range(args.num_prompts)]
    _, free_tokens, free_s = run(free_params)
    outs, json_tokens, json_s = run(json_params)
    valid = 0
    for o in outs:
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except json.JSONDecodeError:
            pass
    free_tps, json_tps = free_tokens / free_s, json_tokens / json_s
    print(f"backend set-up {t1 - t0:.3f} s, cold compile {t2 - t1:.3f} s, cached {1e3 * (t3 - t3a):.3f} ms")
    print(f"{'run':<14}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    print(f"{'no schema':<14}{free_tokens:>8}{free_s:>10.2f}{free_tps:>10.1f}")
    print(f"{'JSON schema':<14}{json_tokens:>8}{json_s:>10.2f}{json_tps:>10.1f}   ({valid}/{len(outs)} parse)")
    print(f"ratio (schema / none): {json_tps / free_tps:.3f}")
    print("RESULT " + json.dumps({"num_prompts": args.num_prompts, "free_tok_s": round(free_tps, 1),
                                  "json_tok_s": round(json_tps, 1), "ratio": round(json_tps / free_tps, 3),
                                  "setup_s": round(t1 - t0, 3), "cold_compile_s": round(t2 - t1, 3),
                                  "cached_compile_ms": round(1e3 * (t3 - t3a), 3), "valid": valid}))


if __name__ == "__main__":
    main()
