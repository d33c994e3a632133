"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Requests and errors by route and code, latencies, tokens, queue depth, batches, facet firings."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sapguard_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.errors = Counter("sapguard_request_errors", "Error responses by route, code and error type",
                              ["route", "code", "type"], registry=r)
        self.latency = Histogram("sapguard_request_latency_seconds", "Request latency (to the last byte) by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("sapguard_time_to_first_token_seconds", "Chat latency to the first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("sapguard_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("sapguard_generated_tokens", "Tokens generated and returned", registry=r)
        self.moderated_texts = Counter("sapguard_moderated_texts", "Texts scanned by /v1/moderations", registry=r)
        self.queue_depth = Gauge("sapguard_queue_depth", "Requests waiting for a batch", registry=r)
        self.running = Gauge("sapguard_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("sapguard_batch_size", "Requests (chat) or texts (moderation) per batch",
                                    ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.facet_firings = Counter("sapguard_facet_firings", "Times a facet fired, by facet and source",
                                     ["facet", "source"], registry=r)
        self.finish = Counter("sapguard_finish_reasons", "Chat completions by finish reason", ["reason"], registry=r)
        self.rejected = Counter("sapguard_queue_rejections", "Requests answered 429 because the queue was full",
                                registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
