"""Prometheus metrics: requests by route and status, queue depth and oldest wait, job outcomes,
and per model: jobs ended and batches sent (counters kept in Redis), the latest p50/p95 wait
and run of the status page's history. deploy/helm/nnfabric/dashboards/nnfabric.json charts them.

What is read from Redis is the same on every api replica: a dashboard takes `max by (model)`
over the replicas rather than a sum."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..common.catalog import Catalog
from ..common.store import ModelStats, Store


class _FromRedis(Collector):
    """Counters Redis keeps (every api replica and scheduler adds to the same ones), exported
    as counters, and the latest history sample's percentiles: as read by the last refresh."""

    def __init__(self) -> None:
        self.stats: dict[str, ModelStats] = {}
        self.latest: dict[str, dict[str, Any]] = {}  # model -> its newest history sample

    def collect(self) -> Iterator[Metric]:
        ended = CounterMetricFamily("nnfabric_model_jobs_finished", "jobs of the model that ended, in any final state",
                                    labels=["model"])  # fmt: skip
        batches = CounterMetricFamily("nnfabric_model_batches", "batches sent to the model's replicas", labels=["model"])
        batch_jobs = CounterMetricFamily("nnfabric_model_batch_jobs", "jobs in those batches", labels=["model"])
        for model, stats in self.stats.items():
            ended.add_metric([model], stats.finished)
            batches.add_metric([model], stats.batches)
            batch_jobs.add_metric([model], stats.batch_jobs)
        yield from (ended, batches, batch_jobs)
        for name, what in (("wait", "created to started"), ("run", "started to ended")):
            family = GaugeMetricFamily(
                f"nnfabric_model_{name}_seconds",
                f"{what}, p50 and p95 over the jobs that ended in the status history's last interval",
                labels=["model", "quantile"],
            )
            for model, sample in self.latest.items():
                for quantile, key in (("0.5", f"{name}_p50_s"), ("0.95", f"{name}_p95_s")):
                    if sample.get(key) is not None:
                        family.add_metric([model, quantile], sample[key])
            yield family


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

        self.from_redis = _FromRedis()
        self.registry.register(self.from_redis)

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
            self.from_redis.stats[spec.name] = await store.model_stats(spec.name)
        latest = await store.history([spec.name for spec in catalog.models], last=1)
        self.from_redis.latest = {model: samples[-1] for model, samples in latest.items() if samples}
        for state, count in (await store.outcomes()).items():
            self.outcomes.labels(state).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
