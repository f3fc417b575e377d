"""A Redis outage on the real fabric (redis-server SIGKILLed, restarted on its data directory and
port, as Kubernetes restarts its pod on its volume): a job that finishes while Redis is down
keeps its result, batches settle as soon as Redis answers, and nothing runs twice. Variants:
the api, or the scheduler, restarted during the outage.

Entries never count as idle during these tests (the scheduler runs with an hour's idle reclaim),
so no job can be rescued by the idle reclaim: each must end by the prompt path. The time from
Redis's return to the last job's end is printed, not asserted (a loaded machine is slower).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from nnfabric.runtime.wire import unpack_result

from services.common.store import Store
from tests.support.jobs import CLEAN, headers, quick_job, slow_job, submit, wait_for

NEVER_IDLE_MS = 3600 * 1000


def record(fabric, job_id: str) -> dict | None:
    """The job's record, or None while the api answers 503 (Redis down or just back)."""
    try:
        response = httpx.get(f"{fabric.url}/v1/jobs/{job_id}", headers=headers(fabric), timeout=30)
    except httpx.TransportError:
        return None  # the api itself restarting
    return response.json() if response.status_code == 200 else None


def events_of(fabric, job_id: str) -> list[tuple[str, float]]:
    """(type, when Redis recorded it) of each event: a stream entry's id is its time in ms."""

    async def read() -> list[tuple[str, float]]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return [(event["type"], int(event["id"].split("-")[0]) / 1000) for event in await store.events(job_id)]
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize(
    "down_s, restarted",
    [(2, None), (30, None), (2, "api"), (2, "scheduler")],
    ids=["down-2s", "down-30s", "api-restarted", "scheduler-restarted"],
)
def test_a_redis_outage_loses_no_result_and_runs_nothing_twice(fabric, alice, down_s, restarted):
    fabric.kill_scheduler()
    fabric.start_scheduler(reclaim_idle_ms=NEVER_IDLE_MS)
    try:
        # A job that finishes during the outage (seconds of work), another that comes up for its
        # turn during it, and small ones queued behind them.
        running = submit(fabric, slow_job(steps=12 if down_s <= 2 else 40))
        wait_for(lambda: (r := record(fabric, running)) is not None and r["state"] == "running", what="a running job")
        second = submit(fabric, slow_job(steps=12))
        small = [submit(fabric, quick_job()) for _ in range(4)]
        fabric.redis.kill()
        if restarted == "api":
            fabric.restart_api()
        elif restarted == "scheduler":
            fabric.kill_scheduler()
            fabric.start_scheduler(reclaim_idle_ms=NEVER_IDLE_MS)
        time.sleep(down_s)  # the outage itself: its length is the scenario, not a wait for an event
        fabric.redis.revive()
        back = time.time()
        jobs = [running, second, *small]
        ended = [wait_for(lambda j=j: (r := record(fabric, j)) is not None and r["state"] in ("completed", "failed",
                                                                                              "cancelled") and r,
                          timeout=300, what=f"job {j} to end") for j in jobs]  # fmt: skip
        assert [r["state"] for r in ended] == ["completed"] * len(jobs), ended
        assert [r.get("attempts") for r in ended] == [1] * len(jobs)  # none started twice
        recorded = {}
        for job_id in jobs:
            events = events_of(fabric, job_id)
            assert [kind for kind, _ in events].count("running") == 1, events
            recorded[job_id] = max(when for kind, when in events if kind == "completed") - back
        # The results are those of local runs.
        with alice.trace(CLEAN):
            expected = alice.transformer.h[1].output.save()
        for job_id in small:
            data = httpx.get(f"{fabric.url}/v1/jobs/{job_id}/result", headers=headers(fabric), timeout=30).content
            (hidden,) = unpack_result(data).values()
            assert torch.equal(hidden, expected.value)
        for job_id in (running, second):
            data = httpx.get(f"{fabric.url}/v1/jobs/{job_id}/result", headers=headers(fabric), timeout=30).content
            (total,) = unpack_result(data).values()
            assert abs(float(total) / 1500.0**2 - 1) < 1e-4
        during = [r["id"] for r in ended if r["finished"] <= back]  # finished while Redis was down
        kept = max((recorded[j] for j in during), default=float("nan"))
        print(f"\nRedis down {down_s} s ({restarted or 'nothing'} restarted): {len(during)} job(s) finished during "
              f"the outage, recorded {kept:.2f} s after Redis returned; all {len(jobs)} jobs ended within "
              f"{max(recorded.values()):.2f} s of its return; each ran once")  # fmt: skip
    finally:
        fabric.kill_scheduler()
        fabric.start_scheduler()
