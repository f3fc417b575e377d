"""Prometheus metrics: requests by route and status, queue depth and oldest wait, job outcomes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..common.catalog import Catalog
from ..common.store import Store


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nnfabric_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "nnfabric_http_request_seconds", "HTTP latency", ["route", "method"], registry=self.registry
        )
        self.depth = Gauge("nnfabric_queue_depth", "jobs waiting", ["model"], registry=self.registry)
        self.oldest = Gauge(
            "nnfabric_queue_oldest_wait_seconds", "wait of the oldest queued job", ["model"], registry=self.registry
        )
        self.replicas = Gauge(
            "nnfabric_model_replicas_ready",
            "replicas holding the model that answered their health check lately",
            ["model"],
            registry=self.registry,
        )
        self.available = Gauge(
            "nnfabric_model_available",
            "1 while the model has a live replica and can run jobs, else 0",
            ["model"],
            registry=self.registry,
        )
        self.outcomes = Gauge(
            "nnfabric_jobs_finished", "jobs by final state (since Redis was created)", ["state"], registry=self.registry
        )

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.requests.labels(path, request.method, str(response.status_code)).inc()
        self.latency.labels(path, request.method).observe(time.perf_counter() - start)
        return response

    async def refresh(self, store: Store, catalog: Catalog) -> None:
        for spec in catalog.models:
            depth, wait = await store.queue_depth(spec.name)
            self.depth.labels(spec.name).set(depth)
            self.oldest.labels(spec.name).set(wait or 0.0)
            live = await store.live_replicas(spec.name)
            self.replicas.labels(spec.name).set(live)
            self.available.labels(spec.name).set(1 if live else 0)
        for state, count in (await store.outcomes()).items():
            self.outcomes.labels(state).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
