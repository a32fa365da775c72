"""N engine replicas behind one OpenAI endpoint, on Ray Serve (the [ray] extra: `pip install pagedllm[ray]`).

Each replica is a Serve deployment replica holding one AsyncLLMEngine and the very app `pagedllm serve` runs
(api_server.build_server: same routes, handlers, limits, API key); Serve's HTTP proxy routes every request to one
replica, streams included. Every response carries `x-pagedllm-replica: <Serve replica id>` so a client (and the
tests) can see which replica answered; /health, /v1/models and /metrics are answered by the replica the request
reached (/metrics: that replica's own engine). Serve's own health check calls check_health (a replica whose engine
thread died is replaced).

`serve run pagedllm.entrypoints.ray_serve:build_app model=PATH replicas=2 device=cpu` builds the application from
`pagedllm serve` options given as a dict (what vLLM's Ray Serve builder takes); `pagedllm serve --replicas N` runs it
(entrypoints/ray_cli.py). This module imports ray: the core package never imports it.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Mapping, Optional

from ray import serve

REPLICA_HEADER = "x-pagedllm-replica"
DEPLOYMENT_NAME = "PagedLLMReplica"

logger = logging.getLogger("pagedllm.ray_serve")


class ReplicaHeader:
    """Pure ASGI: adds the replica's id to every HTTP response's headers (streams included)."""

    def __init__(self, app, replica_id: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment
@serve.ingress()
class PagedLLMReplica:
    """One replica: an engine and the OpenAI app over it, built from plain `pagedllm serve` options."""

    def __init__(self, options: dict):
        from pagedllm.entrypoints.openai.api_server import build_server
        from pagedllm.entrypoints.openai.shutdown import ServerState

        self.replica_id = serve.get_replica_context().replica_tag
        self.state = ServerState()
        self.engine, self.openai_app, _ = build_server(argparse.Namespace(**options), self.state)
        logger.info("replica %s ready", self.replica_id)

    def __serve_build_asgi_app__(self):
        return ReplicaHeader(self.openai_app, self.replica_id)

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine is not running")

    def __del__(self):
        # Serve calls this once the replica has no running request (a replica still busy when
        # graceful_shutdown_timeout_s runs out is killed instead): stop the engine thread and the render workers.
        engine = getattr(self, "engine", None)   # None: __init__ failed before the engine existed
        if engine is not None:
            from pagedllm.chat.render_pool import default_pool
            from pagedllm.entrypoints.openai.shutdown import SHUTDOWN_MESSAGE
            self.state.draining = True
            engine.shutdown(reason=f"{SHUTDOWN_MESSAGE} The request was aborted.")
            default_pool().close()


def parse_options(cli_args: Mapping[str, Any]) -> argparse.Namespace:
    """`pagedllm serve` options from a dict (`serve run ... key=value` gives strings; Python callers may give
    typed values): each key is an option's name (dashes or underscores), `model` the positional MODEL. A bool
    option takes true / false; a JSON option a JSON string or the object itself; a list option a list."""
    from pagedllm.entrypoints.cli import _finish_engine_args, build_parser

    parser = build_parser()
    serve_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    by_flag = {s: a for a in serve_parser._actions for s in a.option_strings}
    argv = ["serve"]
    for key, value in cli_args.items():
        name = str(key).replace("_", "-")
        if name == "model":
            argv.append(str(value))
            continue
        flag = "--" + name
        action = by_flag.get(flag)
        if action is None:
            raise ValueError(f"Unknown pagedllm serve option: {key!r}.")
        if isinstance(action, argparse.BooleanOptionalAction):
            on = value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on", "")
            argv.append(flag if on else "--no-" + name)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, Mapping):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    args = parser.parse_args(argv)
    _finish_engine_args(args)
    return args


def _per_replica_resources(args: argparse.Namespace) -> dict:
    """What one replica needs: with tensor parallelism, one CPU core (CPU) or GPU per rank, all on the replica's
    own node (the "mp" workers are its child processes); --ray-actor-options overrides."""
    tp = int(getattr(args, "tensor_parallel_size", 1) or 1)
    device = str(args.device or "auto")
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resources = {"num_gpus": tp} if device.startswith("cuda") else {"num_cpus": tp}
    return {**resources, **(args.ray_actor_options or {})}


def deployment_options(args: argparse.Namespace) -> dict:
    """Serve deployment options from `pagedllm serve` options: replicas, autoscaling, actor resources."""
    for name in ("autoscaling_config", "ray_actor_options"):
        value = getattr(args, name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {value!r}.")
    options: dict = {"name": DEPLOYMENT_NAME, "ray_actor_options": _per_replica_resources(args),
                     # Serve's router queues beyond this; the engine itself batches up to --max-num-seqs.
                     "max_ongoing_requests": args.max_ongoing_requests or args.max_num_seqs,
                     # Serve waits this long for running requests, then kills the replica (streams are cut).
                     "health_check_period_s": 10, "graceful_shutdown_timeout_s": args.shutdown_drain_seconds,
                     "graceful_shutdown_wait_loop_s": 0.5}
    if args.autoscaling_config is not None:
        config = dict(args.autoscaling_config)
        if args.replicas is not None:
            config.setdefault("initial_replicas", args.replicas)
        options["autoscaling_config"] = config
    else:
        options["num_replicas"] = args.replicas or 1
    return options


def build_serve_app(args: argparse.Namespace):
    """The Serve application (PagedLLMReplica bound to the options every replica builds its engine from)."""
    return PagedLLMReplica.options(**deployment_options(args)).bind(dict(vars(args)))


def build_app(cli_args: Optional[Mapping[str, Any]] = None):
    """The `serve run`-able builder: `serve run pagedllm.entrypoints.ray_serve:build_app model=PATH replicas=2`
    (or a config file's `args:`)."""
    return build_serve_app(parse_options(dict(cli_args or {})))
