"""Prometheus metrics, one registry per app so tests can run many servers in one process."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Every metric lives in this app's registry (never the process-wide default).
        gauge, counter, histogram = (
            functools.partial(kind, registry=self.registry) for kind in (Gauge, Counter, Histogram)
        )
        self.queue_rows = gauge("batchserve_queue_rows", "Rows waiting for admission")
        self.running_rows = gauge("batchserve_running_rows", "Rows in the running batch")
        self.rows_admitted = counter(
            "batchserve_rows_admitted", "Rows admitted into the running batch"
        )
        self.rows_finished = counter(
            "batchserve_rows_finished", "Rows finished, by finish reason", ["reason"]
        )
        self.rows_cancelled = counter(
            "batchserve_rows_cancelled", "Rows dropped because their client went away or timed out"
        )
        self.steps = counter("batchserve_engine_steps", "Engine steps run")
        self.batch_size = histogram(
            "batchserve_batch_size", "Running rows per decode step", buckets=BATCH_BUCKETS
        )
        self.tokens_generated = counter(
            "batchserve_tokens_generated", "Tokens generated (cancelled rows' included)"
        )
        self.step_tokens = histogram(
            "batchserve_step_tokens",
            "Tokens in one step's forward (prompt chunks + decoding rows)",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
        )
        self.prefix_cache_queried = counter(
            "batchserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"
        )
        self.prefix_cache_hits = counter(
            "batchserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache"
        )
        self.request_latency = histogram(
            "batchserve_request_latency_seconds",
            "Time from request arrival to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
        )
        self.queue_wait = histogram(
            "batchserve_queue_wait_seconds",
            "Time from submission until a request's first row is admitted",
            buckets=LATENCY_BUCKETS_S,
        )
        self.requests = counter(
            "batchserve_requests", "HTTP requests by route and status", ["route", "status"]
        )
        self.errors = counter("batchserve_errors", "Errors by kind", ["kind"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
