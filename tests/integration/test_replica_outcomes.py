"""A replica's outcomes while Redis is away, on a real redis-server killed and revived (no Ray:
the replica's recording path on its own): they wait in memory up to NNFABRIC_OUTCOME_BUFFER_BYTES,
past it go to the result store (or, with none, back to the queue), and are recorded exactly once
when Redis answers, even when a first try went through but its reply was lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common.catalog import ModelSpec
from services.common.redis_server import RedisServer
from services.common.result_store import ResultStore
from services.common.settings import Settings
from services.common.store import Store, Transition
from services.worker.deployment import ModelReplica
from services.worker.executor import Outcome
from tests.support.oracles import key_of

# Serve awaits a replica's async __del__ at shutdown; Python's collector, here, cannot.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'ModelReplica.__del__' was never awaited")


def _replica(redis_url: str, results: Path, **settings: object):  # type: ignore[no-untyped-def]
    """The replica's recording state, without a model or Ray (Serve wraps the class)."""
    replica = object.__new__(ModelReplica.func_or_class)  # type: ignore[attr-defined]
    replica.spec = ModelSpec(name="m", source="x")
    replica.settings = Settings(redis_url=redis_url, result_store_dir=str(results), **settings)  # type: ignore[arg-type]
    replica.store = Store.from_url(redis_url)
    replica.results = ResultStore(results)
    replica.replica = "r1"
    replica._recordings = set()
    replica._held = 0
    replica._token_steps, replica._token_flush = [], None
    return replica


async def _until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("shared_store", [True, False], ids=["result-store", "no-result-store"])
def test_outcomes_wait_for_redis_within_their_bound(tmp_path, shared_store):
    server = RedisServer.start(data_dir=tmp_path / "redis")
    results = tmp_path / "results"
    extra = {} if shared_store else {"result_store_min_bytes": 2**63 - 1}

    async def scenario() -> None:
        store = Store.from_url(server.url)
        small_id, big_id, failed_id = jobs = [f"{i:032x}" for i in (1, 2, 3)]
        for job_id in jobs:
            await store.submit(job_id, key_of("alice"), "m", b"payload", {})
        runner = "r1-dispatch"
        await store.transition_many([Transition(j, "running", runner=runner) for j in jobs])
        replica = _replica(server.url, results, outcome_buffer_bytes=1000, **extra)
        server.kill()
        outcomes = {small_id: Outcome(result=b"s" * 600), big_id: Outcome(result=b"b" * 600),
                    failed_id: Outcome(error="boom")}  # fmt: skip
        settling = asyncio.ensure_future(replica._settle(outcomes, runner))
        await _until(lambda: replica._recordings, "the outcomes to wait for Redis")
        assert not settling.done()
        server.revive()
        states = await asyncio.wait_for(settling, 60)
        records = {j: await store.job(j) for j in jobs}
        small = await store.result(small_id)
        events = {j: [e["type"] for e in await store.events(j)] for j in jobs}
        await replica.store.close()
        await store.close()
        assert states[small_id] == "completed" and small == b"s" * 600  # held in memory, then recorded
        assert states[failed_id] == "failed" and records[failed_id]["error"] == "boom"
        if shared_store:
            # Past the 1000-byte bound: written to the result store, recorded with its file's name.
            assert states[big_id] == "completed" and records[big_id]["state"] == "completed"
            assert (results / f"{big_id}.nnfr").read_bytes() == b"b" * 600
        else:
            # No store the api could read: given back, to run again, as if the replica had died.
            assert states[big_id] == "retry" and records[big_id]["state"] == "running"
        for job_id in jobs:
            assert events[job_id].count("running") == 1 and len([e for e in events[job_id] if e != "running"]) <= 2
            assert events[job_id].count("completed") + events[job_id].count("failed") <= 1  # recorded once
        assert replica._held == 0 and not replica._recordings

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_change_whose_reply_was_lost_is_recorded_once(redis_url):
    async def scenario() -> None:
        store = Store.from_url(redis_url)
        await store.submit("twice", key_of("alice"), "m", b"payload", {})
        start = Transition("twice", "running", runner="r1-a")
        assert await store.transition_many([start, start]) == [True, True]  # the retry is recognised
        done = Transition("twice", "completed", {"bytes": 1}, b"x", runner="r1-a")
        assert await store.transition_many([done]) == [True]
        assert await store.transition_many([done]) == [True]  # a retry of the same change: success, nothing new
        other = Transition("twice", "completed", {"bytes": 1}, b"y", runner="r2-b")
        assert await store.transition_many([other]) == [False]  # another runner: the job had ended
        events = [e["type"] for e in await store.events("twice")]
        record = await store.job("twice")
        await store.close()
        assert events == ["queued", "running", "completed"]
        assert record is not None and record["attempts"] == 1 and "runner" not in record

    asyncio.run(scenario())
