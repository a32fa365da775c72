"""`pagedllm serve --replicas N` / `--autoscaling-config JSON`: the Ray Serve application of ray_serve.py on
--host:--port, until SIGTERM / SIGINT.

Ray: a local instance started for this server (no dashboard), or the cluster of --ray-address. On the first
signal Serve deletes the application (the running requests of each replica get --shutdown-drain-seconds to finish;
a replica still busy after that is killed, cutting its streams) and, for a local instance, Serve and Ray shut down;
the process exits 0. A second signal exits at once (128 + signal number), as the one-engine server does.
"""
from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger("pagedllm.server")

APP_NAME = "pagedllm"
RAY_MISSING = ("--replicas and --autoscaling-config run on Ray Serve, which is not installed ({error}). "
               "Install it with: pip install pagedllm[ray]")


class _Stop(Exception):
    """Raised in the main thread by the first SIGTERM / SIGINT."""


def require_ray_serve() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise SystemExit("error: " + RAY_MISSING.format(error=e)) from None


def _on_signal(sig, frame) -> None:
    if getattr(_on_signal, "seen", False):
        logger.warning("second %s: exiting now", signal.Signals(sig).name)
        os._exit(128 + sig)
    _on_signal.seen = True
    logger.info("%s: shutting the replicas down", signal.Signals(sig).name)
    raise _Stop()


def run_replicas(args) -> int:
    require_ray_serve()
    import ray
    from ray import serve

    from pagedllm.entrypoints.ray_serve import build_serve_app

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        app = build_serve_app(args)      # option errors surface before Ray starts
    except ValueError as e:              # ours, and Serve's validation of the deployment options (pydantic)
        raise SystemExit(f"error: {e}") from None
    local = args.ray_address is None
    # "local": always a fresh instance of our own, never a cluster someone else started on this host.
    ray.init(address="local" if local else args.ray_address, include_dashboard=False if local else None,
             logging_level=logging.WARNING)
    # After ray.init, which installs its own SIGTERM handler in the driver.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:   # the replicas failed to start (Serve has retried them): their error is above
            logger.error("%s", e)
            return 1
        logger.info("serving %s on http://%s:%d with Ray Serve (%s)", args.model or "the default model",
                    args.host, args.port,
                    f"autoscaling {args.autoscaling_config}" if args.autoscaling_config is not None
                    else f"{args.replicas} replicas")
        while True:
            signal.pause()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        # Signals keep their handler: a second one exits at once, even during this teardown.
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    logger.info("shut down")
    return 0
