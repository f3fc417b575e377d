"""The status page's history on a real Redis: samples measured from what jobs and batches really
record (the job scripts and the scheduler's batch count), checked against numpy's percentiles and
the times the test gave its jobs; one writer a period however many schedulers; bounded memory;
served as typed columns and as Prometheus metrics."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from nnfabric.protocol import StatusHistory
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from services.api.app import create_app
from services.common.settings import Settings
from services.common.store import Store
from services.scheduler.history import HistorySampler
from tests.support.history import jobs_with_times


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


async def _fresh(redis_url: str) -> Store:
    store = Store.from_url(redis_url)
    await store.redis.flushdb()
    return store


def test_a_sample_measures_what_ended_since_the_one_before(redis_url):
    rng = random.Random(25)
    times = [(rng.uniform(0.01, 5.0), rng.uniform(0.01, 2.0)) for _ in range(13)]

    async def scenario():  # type: ignore[no-untyped-def]
        store = await _fresh(redis_url)
        settings = Settings(redis_url=redis_url, history_interval_s=10, history_s=3600)
        first = await HistorySampler(store, ["m"], settings, "scheduler-a").sample("m")
        await jobs_with_times(store, "m", times, batch=4)  # batches of 4, 4, 4, 1
        _, key = await store.create_key("bob", ["*"])
        await store.submit("never-started", key, "m", b"payload", {})
        await store.submit("still-queued", key, "m", b"payload", {})
        assert await store.transition("never-started", "cancelled")  # ends uncounted in waits and runs
        await store.replica_alive("m", "r1", ttl_s=60)
        # Another scheduler takes the next turn: it goes on from what the first left in Redis.
        second = await HistorySampler(store, ["m"], settings, "scheduler-b").sample("m")
        third = await HistorySampler(store, ["m"], settings, "scheduler-a").sample("m")
        history = (await store.history(["m"]))["m"]
        await store.close()
        return first, second, third, history

    first, second, third, history = run(scenario())
    assert history == [first, second, third]
    # The first sample has nothing to measure from.
    assert first["jobs_per_s"] is None and first["wait_p50_s"] is None and first["batch_size"] is None
    assert (first["queue_depth"], first["replicas"]) == (0, 0)

    ended = second["jobs_per_s"] * (second["t"] - first["t"])
    assert ended == pytest.approx(14)  # 13 completed + 1 cancelled
    assert second["batch_size"] == pytest.approx(13 / 4)
    waits, runs = [w for w, _ in times], [r for _, r in times]
    for name, values in (("wait", waits), ("run", runs)):
        assert second[f"{name}_p50_s"] == pytest.approx(np.percentile(values, 50), abs=1e-5)
        assert second[f"{name}_p95_s"] == pytest.approx(np.percentile(values, 95), abs=1e-5)
    assert (second["queue_depth"], second["replicas"]) == (1, 1)

    # The next sample measures only what ended since: nothing.
    assert third["jobs_per_s"] == 0 and third["wait_p50_s"] is None and third["batch_size"] is None


def test_one_sample_a_period_however_many_schedulers_offer(redis_url):
    async def scenario():  # type: ignore[no-untyped-def]
        store = await _fresh(redis_url)
        settings = Settings(redis_url=redis_url, history_interval_s=60)
        samplers = [HistorySampler(store, ["m", "n"], settings, f"scheduler-{i}") for i in range(3)]
        first = await asyncio.gather(*(s.tick() for s in samplers))
        again = await asyncio.gather(*(s.tick() for s in samplers))  # same period: nobody's turn
        history = await store.history(["m", "n"])
        await store.close()
        return first, again, history

    first, again, history = run(scenario())
    assert sorted(first) == [False, False, True] and not any(again)
    assert [len(samples) for samples in history.values()] == [1, 1]


def test_the_running_sampler_records_every_period_and_stops(redis_url):
    async def scenario():  # type: ignore[no-untyped-def]
        store = await _fresh(redis_url)
        settings = Settings(redis_url=redis_url, history_interval_s=0.2)
        stopping = asyncio.Event()
        loops = [asyncio.create_task(HistorySampler(store, ["m"], settings, f"s{i}").run(stopping)) for i in range(2)]
        deadline = asyncio.get_running_loop().time() + 30
        while len((await store.history(["m"]))["m"]) < 4:
            assert asyncio.get_running_loop().time() < deadline, "no samples recorded"
            await asyncio.sleep(0.05)
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*loops), 10)  # both loops end when told
        samples = (await store.history(["m"]))["m"]
        await store.close()
        return samples

    samples = run(scenario())
    times = [s["t"] for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(s["jobs_per_s"] == 0 for s in samples[1:])


def test_history_memory_is_bounded_and_fades(redis_url):
    async def scenario():  # type: ignore[no-untyped-def]
        store = await _fresh(redis_url)
        settings = Settings(redis_url=redis_url, history_interval_s=1, history_s=5)
        sampler = HistorySampler(store, ["m"], settings, "s")
        await jobs_with_times(store, "m", [(0.1, 0.1)], batch=1)
        written = [await sampler.sample("m") for _ in range(8)]
        kept = (await store.history(["m"]))["m"]
        ttls = [await store.redis.ttl(key) for key in ("nnf:history:m", "nnf:history_state:m", "nnf:timings:m")]
        await store.close()
        return written, kept, ttls, sampler.keep

    written, kept, ttls, keep = run(scenario())
    assert keep == 5 and kept == written[-5:]
    assert all(ttl > 0 for ttl in ttls), ttls


def test_history_and_metrics_routes_serve_the_samples(redis_url, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "x"}, {"name": "idle", "source": "y"}]}))
    settings = Settings(redis_url=redis_url, catalog=str(catalog), history_interval_s=10)

    async def scenario():  # type: ignore[no-untyped-def]
        store = await _fresh(redis_url)
        sampler = HistorySampler(store, ["m", "idle"], settings, "s")
        await sampler.sample("m")
        await jobs_with_times(store, "m", [(0.5, 0.25), (1.5, 0.75), (2.5, 1.25)], batch=2)
        latest = await sampler.sample("m")
        await store.close()
        return latest

    latest = run(scenario())
    with TestClient(create_app(settings)) as api:
        history = api.get("/status/history.json").json()
        metrics = api.get("/metrics").text
    TypeAdapter(StatusHistory).validate_python(history)  # the shape the route declares
    assert history["interval_s"] == 10 and history["window_s"] == 3600
    m, idle = history["models"]
    assert (m["name"], idle["name"]) == ("m", "idle") and idle["t"] == []
    assert len(m["t"]) == 2 and m["t"][-1] == latest["t"] <= history["now"]
    for column in ("queue_depth", "jobs_per_s", "wait_p50_s", "wait_p95_s", "run_p50_s", "run_p95_s",
                   "batch_size", "replicas"):  # fmt: skip
        assert m[column][-1] == latest[column], column
    assert m["wait_p50_s"][-1] == pytest.approx(1.5, abs=1e-5) and m["batch_size"][-1] == 1.5

    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(metrics) for s in family.samples}  # fmt: skip
    assert found[("nnfabric_model_jobs_finished_total", (("model", "m"),))] == 3
    assert found[("nnfabric_model_batches_total", (("model", "m"),))] == 2
    assert found[("nnfabric_model_batch_jobs_total", (("model", "m"),))] == 3
    assert found[("nnfabric_model_wait_seconds", (("model", "m"), ("quantile", "0.5")))] == latest["wait_p50_s"]
    assert found[("nnfabric_model_run_seconds", (("model", "m"), ("quantile", "0.95")))] == latest["run_p95_s"]
    assert ("nnfabric_model_wait_seconds", (("model", "idle"), ("quantile", "0.5"))) not in found
