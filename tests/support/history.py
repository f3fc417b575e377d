"""Jobs with chosen waits and runs, recorded through the real store scripts (for the history's tests)."""

from __future__ import annotations

from services.common.store import Store, Transition


async def jobs_with_times(store: Store, model: str, times: list[tuple[float, float]], batch: int) -> list[str]:
    """Submit one job per (wait, run), send them in batches of `batch` as the scheduler does, and
    end each with exactly that wait and run (the replica's transitions, timed)."""
    _, key = await store.create_key("alice", ["*"], max_active=10_000)
    ids = [f"{model}-job-{i}" for i in range(len(times))]
    for job_id in ids:
        assert await store.submit(job_id, key, model, b"payload", {}) is not None
    for start in range(0, len(ids), batch):
        await store.dequeued(model, ids[start : start + batch])
    for job_id, (wait, run_s) in zip(ids, times, strict=True):
        job = await store.job(job_id)
        assert job is not None
        started = job["created"] + wait
        await store.transition_many([Transition(job_id, "running", at=started)])
        await store.transition_many([Transition(job_id, "completed", at=started + run_s)])
    return ids
