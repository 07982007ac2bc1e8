"""The server's Prometheus metrics (prometheus-client), served at /metrics: requests by path and status,
prompt and generated tokens, the engine's active rows and waiting requests, decode steps, the prefix cache's
hits, and histograms of
the time to the first token and between tokens. Each app has a registry of its own (tests and bench.py run
several servers in one process). prometheus-client is imported here only: without it (a GPU machine with
the core requirements alone) the server runs and /metrics says how to install it."""

from __future__ import annotations

METRICS_INSTALL = "pip install prometheus-client"
# seconds: a CPU's time to first token runs to seconds, a GPU's gaps between tokens to milliseconds
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The counters, gauges and histograms of one server (engine: what the gauges read when scraped)."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lightgpt_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=registry)
        self.prompt_tokens = Counter("lightgpt_prompt_tokens", "prompt tokens of the requests generated for",
                                     registry=registry)
        self.generated_tokens = Counter("lightgpt_generated_tokens", "tokens generated", registry=registry)
        self.first_token = Histogram("lightgpt_time_to_first_token_seconds", "from a request's start to its first "
                                     "token", buckets=FIRST_TOKEN_BUCKETS, registry=registry)
        self.token_gap = Histogram("lightgpt_inter_token_latency_seconds", "between a request's consecutive tokens",
                                   buckets=TOKEN_GAP_BUCKETS, registry=registry)
        Gauge("lightgpt_active_rows", "batch rows decoding", registry=registry).set_function(lambda: engine.active)
        Gauge("lightgpt_waiting_requests", "requests queued for a row", registry=registry).set_function(
            lambda: engine.waiting)
        Gauge("lightgpt_decode_steps", "batched decode steps run", registry=registry).set_function(lambda: engine.steps)
        Gauge("lightgpt_prefix_cache_hit_tokens", "prompt tokens read from the prefix cache instead of prefilled",
              registry=registry).set_function(lambda: engine.cached_tokens)
        Gauge("lightgpt_prefix_cache_hit_ratio", "the share of prompt tokens read from the prefix cache",
              registry=registry).set_function(lambda: engine.cached_tokens / max(1, engine.prompt_tokens))

    def exposition(self) -> tuple[bytes, str]:
        """The text format a Prometheus scrape reads, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def server_metrics(engine) -> ServerMetrics | None:
    """The server's metrics, or None when prometheus-client is not installed."""
    try:
        return ServerMetrics(engine)
    except ImportError:
        return None
