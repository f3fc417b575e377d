"""Pipelined replicas: a replica holds its next batch (payloads fetched and decoded) while the
current one runs. A job waiting in that second slot can be cancelled and never runs; a scheduler
killed with two batches in flight loses nothing and runs nothing twice."""

from __future__ import annotations

import asyncio

import httpx

from services.common.store import Store
from tests.support.jobs import headers, job, quick_job, slow_job, submit, wait_for


def event_types(fabric, job_id: str) -> list[str]:
    async def read() -> list[str]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return [event["type"] for event in await store.events(job_id)]
        finally:
            await store.close()

    return asyncio.run(read())


def in_second_slot(fabric, job_id: str) -> bool:
    """Handed to the replica (out of the queue: no position) but not started."""
    record = job(fabric, job_id)
    return record["state"] == "queued" and record.get("position") is None


def test_a_job_waiting_in_a_replicas_second_slot_can_be_cancelled_and_never_runs(fabric):
    running = submit(fabric, slow_job())
    wait_for(lambda: job(fabric, running)["state"] == "running", what="the first job to run")
    waiting = submit(fabric, slow_job())
    wait_for(lambda: in_second_slot(fabric, waiting), timeout=30, what="the second job to reach the replica")
    response = httpx.delete(f"{fabric.url}/v1/jobs/{waiting}", headers=headers(fabric), timeout=30)
    assert response.status_code == 202 and response.json()["state"] == "cancelled", response.text
    wait_for(lambda: job(fabric, running)["state"] == "completed", what="the running job")
    after = submit(fabric, quick_job())  # the slot it held is free again
    wait_for(lambda: job(fabric, after)["state"] == "completed", timeout=60, what="a later job")
    assert job(fabric, waiting)["state"] == "cancelled"
    assert "running" not in event_types(fabric, waiting)
    assert not job(fabric, waiting).get("attempts")


def test_a_scheduler_killed_with_two_batches_in_flight_loses_nothing_and_runs_nothing_twice(fabric):
    first = submit(fabric, slow_job())
    wait_for(lambda: job(fabric, first)["state"] == "running", what="the first job to run")
    second = submit(fabric, slow_job())
    wait_for(lambda: in_second_slot(fabric, second), timeout=30, what="the second job to reach the replica")
    queued = [submit(fabric, quick_job()) for _ in range(3)]
    fabric.kill_scheduler()
    fabric.start_scheduler(name="scheduler-after-pipelined-kill")  # a new pod: takes over by heartbeat
    try:
        for job_id in [first, second, *queued]:
            wait_for(lambda j=job_id: job(fabric, j)["state"] in ("completed", "failed"), what=f"job {job_id}")
            record = job(fabric, job_id)
            assert record["state"] == "completed", record
            assert event_types(fabric, job_id).count("running") == 1, event_types(fabric, job_id)
            assert record["attempts"] == 1
    finally:
        fabric.kill_scheduler()
        fabric.start_scheduler()
