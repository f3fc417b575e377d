"""The scheduler on a real Redis with a fake dispatch (no Ray): fair share, queue deadlines,
cancellation, and a crashed scheduler's entries taken over by another."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from services.common.catalog import Catalog, ModelLimits, ModelSpec
from services.common.settings import Settings
from services.common.store import Store
from services.scheduler.scheduler import Scheduler
from tests.support.oracles import key_of

MODEL = "tiny"


def catalog(max_batch: int = 1, replicas: int = 1) -> Catalog:
    limits = ModelLimits(max_batch=max_batch)  # type: ignore[call-arg]
    return Catalog(models=[ModelSpec(name=MODEL, source="x", replicas=replicas, limits=limits)])


class FakeReplica:
    """Stands in for the model's Serve deployment: records batches and completes their jobs."""

    def __init__(self, store: Store, hold: asyncio.Event | None = None) -> None:
        self.store = store
        self.batches: list[list[str]] = []
        self.hold = hold

    async def __call__(self, spec: ModelSpec, job_ids: list[str]) -> dict[str, str]:
        self.batches.append(list(job_ids))
        if self.hold is not None:
            await self.hold.wait()
        for job_id in job_ids:
            await self.store.transition(job_id, "running")
            await self.store.transition(job_id, "completed", result=b"ok")
        return dict.fromkeys(job_ids, "completed")

    @property
    def order(self) -> list[str]:
        return [job for batch in self.batches for job in batch]


async def _settle(store: Store, job_ids: list[str], timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [s[0] if s else "missing" for s in await store.states(job_ids)]
        if all(s in ("completed", "failed", "cancelled") for s in states):
            return states
        await asyncio.sleep(0.02)
    raise AssertionError(f"jobs did not finish: {states}")


async def _until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _fresh(url: str, replica: bool = True) -> Store:
    store = Store.from_url(url)
    await store.redis.flushdb()
    if replica:
        await store.replica_alive(MODEL, "fake", 600)  # the scheduler dispatches only to a live model
    return store


async def _backdate(store: Store, job_id: str, seconds: float) -> None:
    """Make a queued job look `seconds` older than it is (its record's creation time)."""
    created = float(await store.redis.hget(f"nnf:job:{job_id}", "created"))
    await store.redis.hset(f"nnf:job:{job_id}", "created", str(created - seconds))


def _settings(url: str, **overrides: object) -> Settings:
    return Settings(redis_url=url, **overrides)  # type: ignore[arg-type]


def test_fair_share_one_job_per_user_in_turn(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        jobs = {user: [f"{user}-{i}" for i in range(n)] for user, n in [("alice", 6), ("bob", 2), ("carol", 1)]}
        for user, ids in jobs.items():
            for job_id in ids:
                await store.submit(job_id, key_of(user), MODEL, b"payload", {})
        replica = FakeReplica(store)
        scheduler = Scheduler(store, catalog(max_batch=1), replica, _settings(redis_url))
        task = asyncio.create_task(scheduler.run())
        states = await _settle(store, [j for ids in jobs.values() for j in ids])
        scheduler.stop()
        await task
        await store.close()
        assert set(states) == {"completed"}
        order = replica.order
        assert sorted(order) == sorted(j for ids in jobs.values() for j in ids)  # each exactly once
        # Bob's and carol's jobs do not wait behind alice's backlog: all run before her third.
        third_of_alice = order.index("alice-2")
        assert all(order.index(j) < third_of_alice for j in jobs["bob"] + jobs["carol"]), order
        # Each user's own jobs keep their order.
        assert [j for j in order if j.startswith("alice")] == jobs["alice"]

    asyncio.run(scenario())


def test_batches_pack_different_users_up_to_max_batch(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        ids = [f"{user}-{i}" for i in range(3) for user in ("alice", "bob")]
        for job_id in ids:
            await store.submit(job_id, key_of(job_id.split("-")[0]), MODEL, b"payload", {})
        replica = FakeReplica(store)
        scheduler = Scheduler(store, catalog(max_batch=4), replica, _settings(redis_url))
        task = asyncio.create_task(scheduler.run())
        await _settle(store, ids)
        scheduler.stop()
        await task
        await store.close()
        assert all(len(b) <= 4 for b in replica.batches) and sum(map(len, replica.batches)) == 6
        first = replica.batches[0]
        assert {j.split("-")[0] for j in first} == {"alice", "bob"}  # both users in the first batch

    asyncio.run(scenario())


def test_queue_deadline_fails_late_jobs_without_running_them(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        await store.submit("late", key_of("alice"), MODEL, b"payload", {})
        await _backdate(store, "late", 3600)  # queued an hour ago (no waiting: no clock in the test)
        await store.submit("fresh", key_of("alice"), MODEL, b"payload", {})
        replica = FakeReplica(store)
        scheduler = Scheduler(store, catalog(max_batch=2), replica, _settings(redis_url, queue_timeout_s=600))
        task = asyncio.create_task(scheduler.run())
        states = await _settle(store, ["late", "fresh"])
        scheduler.stop()
        await task
        late = await store.job("late")
        await store.close()
        assert states == ["failed", "completed"]
        assert late is not None and "deadline" in late.get("error", "")
        assert replica.order == ["fresh"]

    asyncio.run(scenario())


def test_cancelled_jobs_are_never_dispatched(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        for job_id in ("keep", "drop"):
            await store.submit(job_id, key_of("alice"), MODEL, b"payload", {})
        assert await store.transition("drop", "cancelled", {"by": "user"})
        replica = FakeReplica(store)
        scheduler = Scheduler(store, catalog(max_batch=2), replica, _settings(redis_url))
        task = asyncio.create_task(scheduler.run())
        states = await _settle(store, ["keep", "drop"])
        scheduler.stop()
        await task
        depth, _ = await store.queue_depth(MODEL)
        await store.close()
        assert states == ["completed", "cancelled"] and replica.order == ["keep"] and depth == 0

    asyncio.run(scenario())


def test_a_dead_schedulers_entries_are_taken_over(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        ids = [f"job-{i}" for i in range(3)]
        for job_id in ids:
            await store.submit(job_id, key_of("alice"), MODEL, b"payload", {})
        stuck = FakeReplica(store, hold=asyncio.Event())  # never returns: the scheduler "dies" holding them
        first = Scheduler(store, catalog(max_batch=3), stuck, _settings(redis_url, scheduler_name="a"))
        task = asyncio.create_task(first.run())
        while not stuck.batches:
            await asyncio.sleep(0.02)
        task.cancel()  # gone without acknowledging anything
        replica = FakeReplica(store)
        settings = _settings(redis_url, scheduler_name="b", reclaim_idle_ms=300)
        second = Scheduler(store, catalog(max_batch=3), replica, settings)
        task2 = asyncio.create_task(second.run())
        states = await _settle(store, ids)
        second.stop()
        await task2
        await store.close()
        assert states == ["completed"] * 3 and sorted(replica.order) == ids

    asyncio.run(scenario())


class LosingReplica(FakeReplica):
    """Starts every job, then dies mid-batch the first `losses` times it is called."""

    def __init__(self, store: Store, losses: int) -> None:
        super().__init__(store)
        self.losses = losses

    async def __call__(self, spec: ModelSpec, job_ids: list[str]) -> dict[str, str]:
        if self.losses > 0:
            self.losses -= 1
            self.batches.append(list(job_ids))
            for job_id in job_ids:
                await self.store.transition(job_id, "running")
            raise RuntimeError("ActorDiedError: node 10.0.0.7 pid 4242 actor 9f3e... died")
        return await super().__call__(spec, job_ids)


@pytest.mark.parametrize("losses, expected", [(1, "completed"), (2, "failed")])
def test_a_lost_replicas_jobs_run_once_more(redis_url, losses, expected):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        await store.submit("victim", key_of("alice"), MODEL, b"payload", {})
        replica = LosingReplica(store, losses)
        scheduler = Scheduler(store, catalog(max_batch=1), replica, _settings(redis_url))
        task = asyncio.create_task(scheduler.run())
        states = await _settle(store, ["victim"])
        await store.submit("later", key_of("bob"), MODEL, b"payload", {})
        later = await _settle(store, ["later"])
        scheduler.stop()
        await task
        job = await store.job("victim")
        events = [e["type"] for e in await store.events("victim")]
        await store.close()
        assert states == [expected] and later == ["completed"]
        assert replica.order.count("victim") == losses + (expected == "completed")
        assert job is not None and job["attempts"] == min(losses + 1, 2)
        if expected == "failed":
            # The user reads why, not Ray's internals (addresses, process and actor ids).
            assert "replica was lost" in job["error"] and "10.0.0.7" not in job["error"]
        assert events[:3] == ["queued", "running", "queued"]  # queued again, visibly

    asyncio.run(scenario())


def test_a_dead_scheduler_is_taken_over_by_heartbeat_within_seconds(redis_url):
    """A scheduler that vanished (a pod replaced under a new name) holds three entries, one of
    them running on a replica: the new scheduler takes them over within 5 s, long before the
    entries would count as idle, and the running one is not run twice."""

    async def scenario() -> None:
        store = await _fresh(redis_url)
        ids = [f"job-{i}" for i in range(3)]
        for job_id in ids:
            await store.submit(job_id, key_of("alice"), MODEL, b"payload", {})
        hold = asyncio.Event()
        stuck = FakeReplica(store, hold=hold)
        # Entries never count as idle here: only the lapsed heartbeat can hand them over.
        never_idle = 24 * 3600 * 1000
        first = Scheduler(store, catalog(max_batch=1), stuck,
                          _settings(redis_url, scheduler_name="pod-a", reclaim_idle_ms=never_idle))  # fmt: skip
        task = asyncio.create_task(first.run())
        while not stuck.batches:
            await asyncio.sleep(0.02)
        await store.transition(stuck.batches[0][0], "running")  # the replica has started it
        task.cancel()
        replica = FakeReplica(store)
        second = Scheduler(store, catalog(max_batch=1), replica,
                           _settings(redis_url, scheduler_name="pod-b", reclaim_idle_ms=never_idle))  # fmt: skip
        task2 = asyncio.create_task(second.run())
        others = [j for j in ids if j != stuck.batches[0][0]]
        await _settle(store, others, timeout=60)
        hold.set()  # the first replica finishes the job it was running
        states = await _settle(store, ids, timeout=60)
        # The watched entry is acknowledged at a care cycle, without being run again.
        deadline = time.monotonic() + 60
        while (await store.redis.xpending(f"nnf:queue:{MODEL}", "schedulers"))["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        pending = await store.redis.xpending(f"nnf:queue:{MODEL}", "schedulers")
        second.stop()
        await task2
        await store.close()
        assert states == ["completed"] * 3
        assert stuck.batches[0][0] not in replica.order and sorted(replica.order) == sorted(others)
        assert pending["pending"] == 0

    asyncio.run(scenario())


class HangingReplica(FakeReplica):
    """A dispatch that never answers (a replica on a lost node) the first `hangs` times."""

    def __init__(self, store: Store, hangs: int) -> None:
        super().__init__(store)
        self.hangs = hangs

    async def __call__(self, spec: ModelSpec, job_ids: list[str]) -> dict[str, str]:
        if self.hangs > 0:
            self.hangs -= 1
            self.batches.append(list(job_ids))
            for job_id in job_ids:
                await self.store.transition(job_id, "running")
            await asyncio.Event().wait()
        return await super().__call__(spec, job_ids)


@pytest.mark.parametrize("hangs, expected", [(1, "completed"), (2, "failed")])
def test_a_dispatch_that_never_answers_times_out_and_is_retried_once(redis_url, hangs, expected):
    async def scenario() -> None:
        store = await _fresh(redis_url)
        await store.submit("victim", key_of("alice"), MODEL, b"payload", {})
        replica = HangingReplica(store, hangs)
        limits = ModelLimits(max_batch=1, timeout_s=0.2)  # type: ignore[call-arg]
        spec_catalog = Catalog(models=[ModelSpec(name=MODEL, source="x", limits=limits)])
        settings = _settings(redis_url, watchdog_margin_s=0.1, dispatch_grace_s=0.1)
        scheduler = Scheduler(store, spec_catalog, replica, settings)
        task = asyncio.create_task(scheduler.run())
        states = await _settle(store, ["victim"])
        scheduler.stop()
        await task
        job = await store.job("victim")
        await store.close()
        assert states == [expected] and len(replica.batches) == hangs + (expected == "completed")
        if expected == "failed":
            assert job is not None and "replica was lost" in job["error"]

    asyncio.run(scenario())


def test_without_a_live_replica_jobs_wait_visibly_then_run_or_meet_their_deadline(redis_url):
    async def scenario() -> None:
        store = await _fresh(redis_url, replica=False)
        await store.submit("early", key_of("alice"), MODEL, b"payload", {})
        replica = FakeReplica(store)
        scheduler = Scheduler(store, catalog(), replica, _settings(redis_url, queue_timeout_s=600))
        task = asyncio.create_task(scheduler.run())
        await _until(lambda: scheduler.queues[MODEL].users, "the scheduler to hold the job")
        (waiting,) = await store._with_positions([await store.job("early")])  # type: ignore[list-item]
        assert waiting["state"] == "queued" and waiting["position"] == 0 and not replica.batches
        # Never dispatched, yet its deadline holds.
        await _backdate(store, "early", 3600)
        assert await _settle(store, ["early"], timeout=60) == ["failed"]
        failed = await store.job("early")
        await store.submit("later", key_of("bob"), MODEL, b"payload", {})
        await _until(lambda: scheduler.queues[MODEL].users, "the scheduler to hold the later job")
        assert not replica.batches  # held, not dispatched, while no replica is live
        await store.replica_alive(MODEL, "back", 60)  # a replica returns
        later = await _settle(store, ["later"], timeout=60)
        scheduler.stop()
        await task
        await store.close()
        assert failed is not None and "queue deadline" in failed["error"]
        assert later == ["completed"] and replica.order == ["later"]

    asyncio.run(scenario())


