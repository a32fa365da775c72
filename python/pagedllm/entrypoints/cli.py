"""The `pagedllm` command: `pagedllm serve [MODEL]` (the OpenAI-compatible server) and `pagedllm chat [MODEL]`
(an interactive terminal chat on a local engine, streamed, with history, /reset and /exit)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from pagedllm.config import EngineArgs
from pagedllm.chat.render_pool import RenderLimits
from pagedllm.entrypoints.openai.limits import DEFAULT_MAX_BEST_OF, DEFAULT_MAX_PROMPT_CHARS
from pagedllm.entrypoints.openai.shutdown import DEFAULT_DRAIN_SECONDS

# Engine options that the CLI exposes as --kebab-case flags, with their types (EngineArgs' annotations are
# strings under `from __future__ import annotations`).
_ENGINE_OPTIONS = {
    "tokenizer": (str, "tokenizer folder or hub id (default: the model's)"),
    "dtype": (str, "auto, float32, float16 or bfloat16"),
    "seed": (int, "engine seed (requests without a seed draw from it)"),
    "max_model_len": (int, "context length (default: the model's)"),
    "block_size": (int, "KV-cache block size in tokens (16 or 32)"),
    "gpu_memory_utilization": (float, "fraction of GPU memory for weights + KV cache"),
    "swap_space": (float, "GiB of host memory for swapped-out KV blocks (GPU)"),
    "kv_cache_space": (float, "GiB of KV cache on the CPU (default 4)"),
    "num_gpu_blocks_override": (int, "number of KV blocks, overriding the memory-based size"),
    "enable_prefix_caching": (bool, "reuse KV blocks of shared prompt prefixes"),
    "enable_chunked_prefill": (bool, "split long prompts over several steps"),
    "max_num_seqs": (int, "sequences in one batch at most"),
    "max_num_batched_tokens": (int, "tokens in one step at most"),
    "max_logprobs": (int, "largest logprobs / top_logprobs a request may ask"),
    "device": (str, "auto, cpu or cuda[:N]"),
    "tensor_parallel_size": (int, "split the model over N ranks (torch.distributed: NCCL on CUDA, gloo on the CPU)"),
    "distributed_executor_backend": (str, "mp (worker processes on this host, the default) or ray (Ray actors)"),
    "revision": (str, "model revision on the hub"),
    "download_dir": (str, "where hub models are downloaded"),
    "preemption_mode": (str, "recompute or swap"),
    "load_format": (str, "auto, or dummy: random weights from the model's config.json (benchmarks)"),
    "trust_remote_code": (bool, "accepted for vLLM compatibility (pagedllm runs no remote code)"),
    "runner": (str, "auto, generate or pooling (embedding / classification / score models)"),
    "convert": (str, "pooling models: embed, classify or reward (e.g. a *ForCausalLM as an embedder)"),
    "task": (str, "vLLM 0.10's name: embed, classify, score or reward (implies --runner pooling)"),
    "pooler_config": (str, 'JSON, e.g. \'{"pooling_type": "MEAN", "normalize": false}\''),
    "override_pooler_config": (str, "vLLM 0.10's name of --pooler-config"),
    "speculative_config": (json.loads, 'speculative decoding, as JSON: {"method": "ngram", '
                           '"num_speculative_tokens": 4, "prompt_lookup_max": 4} or {"method": "draft_model", '
                           '"model": PATH, "num_speculative_tokens": 4}'),
    "enforce_eager": (bool, "run every step eagerly: no CUDA graphs (by default decode steps of up to "
                            "max_num_seqs sequences replay graphs captured at start-up, on CUDA)"),
    "structured_outputs_config": (json.loads, 'structured outputs, as JSON: {"backend": "auto" | "xgrammar" | '
                                              '"guidance", "reasoning_parser": "deepseek_r1" | "qwen3"}'),
    "guided_decoding_backend": (str, "vLLM 0.10's name for the structured outputs backend"),
    "quantization": (str, "gguf (a GGUF's codes, fp32 math: the default) or gguf_int8 (CPU: int8 activations x "
                          "the codes, faster, approximate)"),
    "num_scheduler_steps": (int, "decode forwards run in a row before the engine's per-token work (multi-step "
                                 "decoding: the same tokens, streamed in bursts; default 1 for the server)"),
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    parser.add_argument("model", nargs="?", default=None,
                        help="a local HF model folder, a .gguf file or a hub id (default: the built-in default model)")
    parser.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    group = parser.add_argument_group("engine")
    for name, (typ, help_text) in _ENGINE_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(flag, type=typ, default=default, help=help_text)


def engine_args_from(args):
    """AsyncEngineArgs from a parsed namespace (the EngineArgs fields it holds)."""
    from pagedllm.config import AsyncEngineArgs
    kwargs = {name: getattr(args, name) for name in AsyncEngineArgs.field_names() if hasattr(args, name)}
    reasoning = getattr(args, "reasoning_parser", None)
    config = kwargs.get("structured_outputs_config")
    # As in vLLM: a reasoning server constrains outputs only after the reasoning. A config that is not a JSON
    # object is left to the engine's own validation (its error names the problem).
    if reasoning is not None and (config is None or isinstance(config, dict)):
        from pagedllm.sampling.structured_params import REASONING_PARSERS
        config = dict(config or {})
        config.setdefault("reasoning_parser", reasoning if reasoning in REASONING_PARSERS else "think")
        kwargs["structured_outputs_config"] = config
    return AsyncEngineArgs(**kwargs)


def _finish_engine_args(args) -> None:
    if args.model_flag is not None:
        if args.model is not None and args.model != args.model_flag:
            raise SystemExit(f"error: two models given: {args.model!r} and --model {args.model_flag!r}")
        args.model = args.model_flag


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: a small vLLM-compatible LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $PAGEDLLM_API_KEY)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="the model name(s) requests use; the first is the one responses carry")
    server.add_argument("--chat-template", default=None,
                        help="a chat template: a .jinja path, a shipped template name or the template itself")
    server.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"])
    server.add_argument("--tool-call-parser", default=None,
                        help="hermes, llama3_json, mistral or pythonic (default: picked from the chat template)")
    server.add_argument("--reasoning-parser", default=None,
                        help="split <think>...</think> reasoning into reasoning_content (any name, e.g. qwen3)")
    server.add_argument("--max-queue-size", type=int, default=1024,
                        help="requests that may wait beyond --max-num-seqs before the server answers 503")
    server.add_argument("--max-request-body-bytes", type=int, default=16 << 20,
                        help="larger request bodies are refused with 413")
    server.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                        help="longer prompts (a completion prompt, the rendered chat, /tokenize) are refused "
                             "with 400 before tokenization")
    server.add_argument("--max-best-of", type=int, default=DEFAULT_MAX_BEST_OF,
                        help="largest n / best_of a request may ask (400 above it; also refused: more samples "
                             "than the KV cache holds at full length)")
    server.add_argument("--chat-template-timeout", type=float, default=RenderLimits.timeout_s,
                        help="seconds a chat template may take to render (in a worker process, killed at the "
                             "limit; 400)")
    server.add_argument("--chat-template-max-memory-mb", type=int, default=RenderLimits.max_memory_bytes >> 20,
                        help="address space of a chat template render worker, MiB (0: no cap)")
    server.add_argument("--shutdown-drain-seconds", type=float, default=DEFAULT_DRAIN_SECONDS,
                        help="on SIGTERM / SIGINT, how long running requests may finish before the rest are "
                             "aborted; a second signal exits at once")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    replicas = serve.add_argument_group("replicas (Ray Serve: pip install pagedllm[ray])")
    replicas.add_argument("--replicas", type=_positive_int, default=None, metavar="N",
                          help="serve N engine replicas behind this endpoint, on Ray Serve (each with the engine "
                               "options above)")
    replicas.add_argument("--autoscaling-config", type=json.loads, default=None, metavar="JSON",
                          help='Ray Serve autoscaling, as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4, '
                               '"target_ongoing_requests": 32}\' (--replicas, if given, is the initial count)')
    replicas.add_argument("--ray-address", default=None, metavar="ADDRESS",
                          help="a running Ray cluster, e.g. auto or ray://host:10001 (None: a local Ray instance "
                               "started for this server)")
    replicas.add_argument("--ray-actor-options", type=json.loads, default=None, metavar="JSON",
                          help='each replica\'s Ray resources, as JSON, e.g. \'{"num_cpus": 4}\' (None: one CPU, '
                               'or one GPU on CUDA, per tensor-parallel rank)')
    replicas.add_argument("--max-ongoing-requests", type=_positive_int, default=None, metavar="N",
                          help="requests Serve sends one replica at once (None: --max-num-seqs)")

    chat = sub.add_parser("chat", help="chat with a model in the terminal",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(chat)
    opts = chat.add_argument_group("chat")
    opts.add_argument("--system", "--system-prompt", dest="system", default=None, help="a system message")
    opts.add_argument("--chat-template", default=None)
    opts.add_argument("--max-tokens", type=int, default=512)
    opts.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    opts.add_argument("--top-p", type=float, default=None)
    opts.add_argument("--top-k", type=int, default=None)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _finish_engine_args(args)
    if args.command == "serve" and (args.replicas is not None or args.autoscaling_config is not None):
        from pagedllm.entrypoints.ray_cli import run_replicas
        return run_replicas(args)
    if args.command == "serve":
        from pagedllm.entrypoints.openai.api_server import run_server
        run_server(args)
        return 0
    if args.command == "chat":
        try:
            return run_chat(args)
        except KeyboardInterrupt:
            print()
            return 0
    return 2


# --- pagedllm chat ---------------------------------------------------------------------------------------

_HELP = "Commands: /reset (forget the conversation), /exit (quit). End a message with Enter."


def run_chat(args, stdin=None, stdout=None) -> int:
    from pagedllm.chat.chat import render_conversations
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.serving_common import DeltaTracker

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    engine = LLMEngine.from_engine_args(engine_args_from(args))
    tokenizer = engine.get_tokenizer()
    model_type = getattr(engine.hf_config, "model_type", None)
    defaults = engine.get_default_sampling_params()
    overrides = {name: getattr(args, name) for name in ("temperature", "top_p", "top_k")
                 if getattr(args, name) is not None}
    params = dataclasses.replace(defaults, max_tokens=args.max_tokens, **overrides)

    def fresh() -> list[dict]:
        return [{"role": "system", "content": args.system}] if args.system else []

    history = fresh()
    interactive = stdin.isatty()
    stdout.write(f"pagedllm chat: {args.model or 'the default model'}. {_HELP}\n")
    stdout.flush()
    turn = 0
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:          # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = fresh()
            stdout.write("(conversation reset)\n")
            stdout.flush()
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            stdout.write(_HELP + "\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            _, (prompt,) = render_conversations(tokenizer, [history], chat_template=args.chat_template,
                                                model_type=model_type)
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            request_id = f"chat-{turn}"
            turn += 1
            engine.add_request(request_id, {"prompt_token_ids": ids, "prompt": prompt}, params)
        except ValueError as e:
            history.pop()
            stdout.write(f"error: {e}\n")
            stdout.flush()
            continue
        tracker = DeltaTracker.for_stops(params.stop, params.include_stop_str_in_output)
        answer = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    o = out.outputs[0]
                    delta, _, _ = tracker.advance(o)
                    if delta:
                        stdout.write(delta)
                        stdout.flush()
                    if out.finished:
                        answer = o.text
        except KeyboardInterrupt:   # stop this answer, keep the chat
            engine.abort_request(request_id)
            answer = ""
        failure = engine.pop_request_errors().get(request_id)   # it failed inside a step (already aborted)
        if failure is not None:
            stdout.write(f"\nerror: {failure}")
            answer = ""
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": answer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
