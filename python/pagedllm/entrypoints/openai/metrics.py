"""/metrics: Prometheus text for one server (its own registry, so several servers can live in one process).

Gauges and token counters are read at scrape time from the engine thread's snapshot (AsyncLLMEngine.snapshot);
latency histograms are observed by the engine thread as outputs come out (AsyncLLMEngine.stat_observers).
Names follow vLLM's, with the pagedllm: prefix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


class _SnapshotCollector:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        s = self.engine.snapshot
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"pagedllm:{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(f"pagedllm:{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("num_requests_running", "Requests with sequences in the running batch.", s["num_requests_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["num_requests_waiting"])
        yield gauge("num_requests_swapped", "Requests swapped out to host memory.", s["num_requests_swapped"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100%).", s["kv_cache_usage"])
        yield gauge("num_kv_blocks_used", "KV-cache blocks in use.", s["num_used_blocks"])
        yield gauge("num_kv_blocks_free", "KV-cache blocks free (incl. evictable prefix-cache blocks).",
                    s["num_free_blocks"])
        yield gauge("num_kv_blocks_total", "KV-cache blocks in all.", s["num_blocks"])
        yield counter("num_preemptions", "Sequences preempted (recompute or swap).", s["num_preemptions"])
        yield counter("prompt_tokens", "Prompt tokens received.", s["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", s["generation_tokens"])
        spec = s.get("spec_decode")
        if spec is not None:  # speculative decoding (vLLM's spec_decode_* counters)
            yield counter("spec_decode_num_drafts", "Verification rounds of proposed tokens.", spec["num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Proposed tokens.", spec["num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Accepted proposed tokens.",
                          spec["num_accepted_tokens"])
            per_pos = CounterMetricFamily("pagedllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted proposed tokens, by position in the proposal.",
                                          labels=["model_name", "position"])
            for pos, n in enumerate(spec["accepted_per_pos"]):
                per_pos.add_metric([self.model_name, str(pos)], n)
            yield per_pos


class ServerMetrics:
    """Prometheus metrics of one server; registered with the engine as a stat observer."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.ttft = Histogram("pagedllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("pagedllm:inter_token_latency_seconds", "Time between tokens of a request.", labels,
                             buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("pagedllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.success = Counter("pagedllm:request_success", "Finished requests, by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self.registry.register(_SnapshotCollector(engine, model_name))
        engine.stat_observers.append(self)

    # StatObserver (called on the engine thread)
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, output, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        for o in output.outputs:
            self.success.labels(self.model_name, o.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
