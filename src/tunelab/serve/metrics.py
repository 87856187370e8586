"""Prometheus metrics of the server (prometheus_client, one registry per app so tests can run several)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Info, generate_latest


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tunelab_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=registry)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self.completion_tokens = Counter("tunelab_completion_tokens", "Tokens generated", ["model"], registry=registry)
        self.rejected = Counter("tunelab_rejected_requests", "Requests refused before generating", ["reason"],
                                registry=registry)
        self.cancelled = Counter("tunelab_cancelled_generations", "Generations stopped early", ["reason"],
                                 registry=registry)
        self.in_flight = Gauge("tunelab_requests_in_flight", "Requests generating or queued", registry=registry)
        batches = Gauge("tunelab_batches", "Forward passes of the worker (decoding steps and prefills of joining requests)",
                        registry=registry)
        batches.set_function(lambda: engine.batches)
        rows = Gauge("tunelab_batch_rows", "Rows in those forward passes (rows / batches = mean batch size)",
                     registry=registry)
        rows.set_function(lambda: engine.batch_rows)
        reused = Gauge("tunelab_prefix_cached_tokens", "Prompt tokens taken from the adapters' cached prompt prefixes "
                       "instead of prefilled (of tunelab_prompt_tokens_total)", registry=registry)
        reused.set_function(lambda: engine.prefix_reused_tokens)
        held = Gauge("tunelab_prefix_cache_bytes", "Memory held by the cached prompt prefixes' keys and values "
                     "(at most one prefix per adapter)", registry=registry)
        held.set_function(lambda: engine.prefix_bytes)
        precision = engine.precision  # None: a page-only server, no model
        if precision is not None:
            Info("tunelab_model", "The served model's weights dtype and why it was chosen",
                 registry=registry).info({"dtype": precision.dtype, "dtype_reason": precision.reason})

    def request(self, endpoint: str, model: str, status: int) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()

    def finished(self, model: str, request: Any) -> None:
        self.prompt_tokens.labels(model).inc(len(request.prompt_ids))
        self.completion_tokens.labels(model).inc(len(request.token_ids))
        if request.finish_reason == "timeout":
            self.cancelled.labels("timeout").inc()
        elif request.finish_reason == "cancelled":
            self.cancelled.labels("disconnect").inc()

    def render(self, in_flight: int) -> tuple[bytes, str]:
        self.in_flight.set(in_flight)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
