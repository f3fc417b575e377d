"""The scheduler: per-model Redis streams in, fair batches out to the model's Ray Serve replicas.

    scheduler = Scheduler(store, catalog, ray_dispatch(), Settings())
    await scheduler.run()           # until stop() is called

Each model's stream has one consumer group; every scheduler process is a consumer in it, so
two can run side by side. An entry is acknowledged only after its job reached a final state,
so a scheduler that dies loses nothing: its unacknowledged entries are claimed again, by
itself on restart, or by a peer as soon as its heartbeat lapses (HEARTBEAT_TTL_S; a new pod
under a new name does not wait for the entries to go idle). A claimed job that a replica is
still running is watched, not run again: it ends there, or is treated as lost once its time
limits have passed.

No job waits forever: every dispatch has a timeout derived from the job's limits (the replica's
own watchdog fires first); while a model has no live replica its jobs stay queued, their
positions shown, and the queue deadline is enforced on every job at all times.

A Redis outage stalls nothing for longer than it lasts: what was waiting for Redis (acks,
requeues) is done the moment it answers, and a dispatch's deadline does not run meanwhile (the
replica waits for Redis to start or record its jobs; giving up on it would run them twice).

Every scheduler also offers to sample the status page's history (history.py); one per period does.

Fair share: waiting jobs are queued per user, and a batch takes one job from each user in
turn, starting after the user served first last time; a user with 100 jobs waits behind a
user with 1 only for that one job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nnfabric.protocol import TERMINAL
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..common.catalog import Catalog, ModelSpec
from ..common.result_store import ResultStore
from ..common.settings import Settings
from ..common.store import QueueEntry, Store
from .history import HistorySampler

log = logging.getLogger("nnfabric.scheduler")

Dispatch = Callable[[ModelSpec, list[str]], Awaitable[dict[str, str]]]
_Entry = QueueEntry
MAX_ATTEMPTS = 2  # a job whose replica is lost runs once more
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_REDIS_RETRY_S = 0.5
HEARTBEAT_S = 1.0  # how often a scheduler says it is alive (and looks after its queues)
HEARTBEAT_TTL_S = 3  # a scheduler silent this long is dead: its entries are taken over


@dataclass
class _ModelQueue:
    spec: ModelSpec
    users: OrderedDict[str, deque[_Entry]] = field(default_factory=OrderedDict)
    known: set[str] = field(default_factory=set)
    in_flight: int = 0
    held_since: float | None = None  # when a partial batch began waiting for more jobs
    # Claimed jobs a replica may still be running (their scheduler died): entry -> when first seen.
    watching: dict[str, tuple[_Entry, float]] = field(default_factory=dict)

    def add(self, entry: _Entry) -> None:
        if entry.stream_id in self.known:
            return
        self.known.add(entry.stream_id)
        self.users.setdefault(entry.user, deque()).append(entry)

    def take_batch(self, size: int) -> list[_Entry]:
        """Round robin over users; the user served first moves to the back."""
        batch: list[_Entry] = []
        while len(batch) < size and self.users:
            for user in list(self.users):
                if len(batch) >= size:
                    break
                queue = self.users.pop(user)
                batch.append(queue.popleft())
                if queue:
                    self.users[user] = queue  # back of the line
        return batch

    def done(self, entry: _Entry) -> None:
        self.known.discard(entry.stream_id)

    def waiting(self) -> int:
        return sum(len(entries) for entries in self.users.values())


class _Outages:
    """How long Redis has been unreachable, all told, as this scheduler saw it: a dispatch's
    deadline does not run while Redis is away (the replica waits for Redis to start or record
    its jobs, and a dispatch given up then would run its jobs twice)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.before = 0.0

    def down(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("Redis unreachable (%s); waiting for it, nothing is lost meanwhile", type(exc).__name__)

    def up(self) -> None:
        if self.since is not None:
            log.warning("Redis answers again after %.1f s", time.monotonic() - self.since)
            self.before += time.monotonic() - self.since
            self.since = None

    def total(self) -> float:
        return self.before + (time.monotonic() - self.since if self.since is not None else 0.0)


class Scheduler:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        dispatch: Dispatch,
        settings: Settings,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.dispatch = dispatch
        self.name = settings.scheduler_name
        self.queue_timeout_s = settings.queue_timeout_s
        self.reclaim_idle_ms = settings.reclaim_idle_ms
        self.watchdog_margin_s = settings.watchdog_margin_s
        self.results = ResultStore(settings.result_store_dir)
        self.result_ttl_s = settings.result_ttl_s
        self._last_sweep = 0.0
        self.dispatch_grace_s = settings.dispatch_grace_s
        self.batch_hold_s = settings.batch_hold_ms / 1000
        self.queues = {spec.name: _ModelQueue(spec) for spec in catalog.models}
        self._stopping = asyncio.Event()
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.outages = _Outages()
        self._live_until: dict[str, float] = {}  # model -> until when a replica is known to answer
        # The status page's history: every scheduler offers, one per period samples (history.py).
        self.history = HistorySampler(store, [spec.name for spec in catalog.models], settings, self.name)

    async def run(self) -> None:
        await self._until_redis_answers(self._start)
        sampling = asyncio.create_task(self.history.run(self._stopping))
        last_care = 0.0
        reading: asyncio.Task[None] | None = None
        while not self._stopping.is_set():
            try:
                if time.monotonic() - last_care > min(HEARTBEAT_S, self.reclaim_idle_ms / 2000):
                    await self._care()
                    last_care = time.monotonic()
                # Wait for new entries, or for a batch to end (its replica is free now): whichever is first.
                reading = reading or asyncio.create_task(self._read_new())
                freed = asyncio.create_task(self._freed.wait())
                await asyncio.wait({reading, freed}, return_when=asyncio.FIRST_COMPLETED)
                freed.cancel()
                self._freed.clear()
                if reading.done():
                    task, reading = reading, None
                    task.result()
                for name in self.queues:
                    await self._dispatch_ready(name)
                self.outages.up()
            except _REDIS_DOWN as exc:
                # Redis restarting: nothing is lost (entries stay pending in its streams); wait and go on.
                self.outages.down(exc)
                await asyncio.sleep(_REDIS_RETRY_S)
            except Exception:
                # A bug or a malformed record must not stop every queue: say so and go on (the
                # entries stay pending, so nothing is lost).
                log.exception("scheduler loop failed; going on")
                await asyncio.sleep(_REDIS_RETRY_S)
        if reading is not None:
            reading.cancel()
        await asyncio.gather(sampling, *self._tasks, return_exceptions=True)

    async def _care(self) -> None:
        """Once a second: say we are alive, take over dead schedulers' entries, enforce deadlines,
        and settle claimed jobs that were running elsewhere."""
        await self.store.heartbeat(f"scheduler:{self.name}", HEARTBEAT_TTL_S)
        alive = {name.removeprefix("scheduler:") for name in await self.store.alive("scheduler:")}
        if time.monotonic() - self._last_sweep > 60:
            # Large results outlive their jobs' records by no more than a minute.
            self._last_sweep = time.monotonic()
            await asyncio.to_thread(self.results.sweep, self.result_ttl_s)
        for name, queue in self.queues.items():
            self._add(await self.store.take_over(name, self.name, alive | {self.name}))
            self._add(await self.store.reclaim(name, self.name, self.reclaim_idle_ms))
            await self._enforce_deadlines(queue)
            await self._settle_watched(queue)

    async def _enforce_deadlines(self, queue: _ModelQueue) -> None:
        waiting = [entry for entries in queue.users.values() for entry in entries]
        if not waiting:
            return
        expired = {e.stream_id for e in await self._expired(waiting)}
        if expired:
            for user in list(queue.users):
                kept = deque(e for e in queue.users[user] if e.stream_id not in expired)
                if kept:
                    queue.users[user] = kept
                else:
                    del queue.users[user]

    async def _expired(
        self, entries: list[_Entry], states: list[tuple[str, float] | None] | None = None
    ) -> list[_Entry]:
        """Fail (and acknowledge) the entries whose job waited past the queue deadline or ended
        (`states`: the jobs' states where already read)."""
        gone = []
        if states is None:
            states = await self.store.states([e.job_id for e in entries])
        for entry, found in zip(entries, states, strict=True):
            if found is None or found[0] in TERMINAL:
                await self._ack(entry)
                gone.append(entry)
            elif found[0] == "queued" and time.time() - found[1] > self.queue_timeout_s:
                message = f"the job waited past the queue deadline ({self.queue_timeout_s:g} s) without a replica free to run it"
                await self.store.transition(entry.job_id, "failed", {"message": message}, error=message)
                await self._ack(entry)
                gone.append(entry)
        return gone

    def _dispatch_timeout(self, spec: ModelSpec, jobs: int) -> float:
        # The replica's watchdog gives up at timeout_s * (jobs + 1) + margin; this is later still.
        return spec.limits.timeout_s * (jobs + 1) + self.watchdog_margin_s + self.dispatch_grace_s

    async def _settle_watched(self, queue: _ModelQueue) -> None:
        if not queue.watching:
            return
        items = list(queue.watching.values())
        jobs = [await self.store.job(entry.job_id) for entry, _ in items]
        lost = []
        for (entry, seen), job in zip(items, jobs, strict=True):
            if job is None or job["state"] in TERMINAL:
                del queue.watching[entry.stream_id]
                await self._ack(entry)
            elif job["state"] == "queued":  # requeued meanwhile: it waits its turn again
                del queue.watching[entry.stream_id]
                queue.done(entry)
                queue.add(entry)
            elif time.time() - job.get("started", seen) > self._dispatch_timeout(queue.spec, queue.spec.limits.max_batch):
                del queue.watching[entry.stream_id]
                lost.append(entry)
        if lost:
            log.warning("jobs %s were running under a scheduler that died and never ended", [e.job_id for e in lost])
            await self._replica_lost(queue, lost)

    async def _start(self) -> None:
        await self.store.heartbeat(f"scheduler:{self.name}", HEARTBEAT_TTL_S)  # before claiming anything
        for spec in self.catalog.models:
            await self.store.ensure_queue(spec.name)
        # Entries this consumer had read but not acknowledged before a restart.
        self._add(await self.store.read_queues(list(self.queues), self.name, pending=True, count=10_000))

    async def _until_redis_answers(self, action: Callable[[], Awaitable[None]]) -> None:
        """`action`, tried again until Redis answers (or the scheduler stops): the moment Redis
        is back, what was waiting for it is done, without waiting for any idle reclaim."""
        delay = 0.05
        while not self._stopping.is_set():
            try:
                await action()
                self.outages.up()
                return
            except _REDIS_DOWN as exc:
                self.outages.down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REDIS_RETRY_S)

    def stop(self) -> None:
        self._stopping.set()
        self._freed.set()  # wake the loop so it sees the stop

    async def _read_new(self) -> None:
        self._add(await self.store.read_queues(list(self.queues), self.name, block_ms=500))

    def _add(self, entries: list[_Entry]) -> None:
        for entry in entries:
            if entry.model in self.queues:
                self.queues[entry.model].add(entry)

    async def _dispatch_ready(self, name: str) -> None:
        queue = self.queues[name]
        if not queue.users:
            queue.held_since = None  # its jobs ended or expired while held: the next batch waits afresh
        if not queue.users or not await self._replicas_live(name):
            return  # no replica answers: the jobs wait (their positions shown) until one returns
        # Two batches per replica the model may have (one running, the next decoded and ready):
        # with autoscaling, batches beyond the live replicas wait in Serve's router, which is the
        # backlog Serve scales up on. Once every replica has a batch, the next goes when it is
        # full, when one ends or after the hold: jobs arriving meanwhile fill it, and each batch's
        # fixed costs (a Serve call, Redis round trips, a forward pass) are shared by more jobs.
        while queue.in_flight < queue.spec.most_in_flight and queue.users:
            if queue.in_flight >= queue.spec.most_replicas and queue.waiting() < queue.spec.limits.max_batch:
                now = time.monotonic()
                if queue.held_since is None:
                    queue.held_since = now
                    asyncio.get_running_loop().call_later(self.batch_hold_s, self._freed.set)
                if now - queue.held_since < self.batch_hold_s - 1e-3:  # the timer may fire a tick early
                    return
            queue.held_since = None
            taken = queue.take_batch(queue.spec.limits.max_batch)
            try:
                batch = await self._live(name, taken)
            except _REDIS_DOWN:
                for entry in reversed(taken):  # back at the front of their users' lines, in order
                    if entry.stream_id in queue.known:
                        queue.users.setdefault(entry.user, deque()).appendleft(entry)
                        queue.users.move_to_end(entry.user, last=False)
                raise
            if not batch:
                continue
            # Out of the queue before the batch's task starts: its first step is then the call to
            # the replica, so batches reach replicas in the order they were taken (a user's jobs
            # keep their order even with two batches in flight).
            taken_ids = [e.job_id for e in batch]
            await self._until_redis_answers(lambda: self.store.dequeued(name, taken_ids))  # noqa: B023 (awaited here)
            ahead = queue.in_flight  # batches that may run before this one on the same replica
            queue.in_flight += 1
            task = asyncio.create_task(self._run_batch(name, batch, ahead))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replicas_live(self, name: str) -> bool:
        """Whether a replica of the model answers (read from Redis at most every half second)."""
        now = time.monotonic()
        if self._live_until.get(name, 0.0) > now:
            return True
        if await self.store.live_replicas(name):
            self._live_until[name] = now + 0.5
            return True
        return False

    async def _live(self, name: str, batch: list[_Entry]) -> list[_Entry]:
        """Drop jobs that were cancelled or ended meanwhile, and fail those past their deadline
        (one read of the batch's states for both)."""
        states = await self.store.states([e.job_id for e in batch])
        gone = {e.stream_id for e in await self._expired(batch, states)}
        live = []
        for entry, found in zip(batch, states, strict=True):
            if entry.stream_id in gone:
                continue
            if found is not None and found[0] == "running":
                # Claimed from a dead scheduler while a replica ran it: never start it twice.
                self.queues[name].watching[entry.stream_id] = (entry, time.time())
                continue
            live.append(entry)
        return live

    async def _run_batch(self, name: str, batch: list[_Entry], ahead: int = 0) -> None:
        queue = self.queues[name]
        job_ids = [e.job_id for e in batch]
        try:
            try:
                waiting = ahead * queue.spec.limits.timeout_s * (queue.spec.limits.max_batch + 1)
                states = await self._dispatched(queue.spec, job_ids, self._dispatch_timeout(queue.spec, len(batch)) + waiting)
            except Exception as exc:  # the replica failed as a whole (its process or node died, or it hangs)
                # The operator's log gets Ray's details with the job ids; the users get a plain reason.
                log.error("dispatch of jobs %s to %s failed: %s: %s", job_ids, name, type(exc).__name__, exc)
                await self._replica_lost(queue, batch)
                return
            # Jobs the replica gave back unstarted (it had to stop) go round again; jobs another
            # dispatch had started (before this scheduler took over) are watched until they end.
            retry = [e for e in batch if states.get(e.job_id) == "retry"]
            elsewhere = [e for e in batch if states.get(e.job_id) == "elsewhere"]
            for entry in elsewhere:
                queue.watching[entry.stream_id] = (entry, time.time())
            await self._replica_lost(queue, retry)
            done = [e for e in batch if e not in retry and e not in elsewhere]
            await self._until_redis_answers(lambda: self._ack(*done))
        except Exception:
            # A bug: the entries stay pending in the stream; forgetting them here lets the
            # reclaim loop hand them out again once they have been idle long enough.
            log.exception("batch on %s could not be settled; its jobs will be reclaimed", name)
            for entry in batch:
                queue.done(entry)
        finally:
            queue.in_flight -= 1
            self._freed.set()

    async def _dispatched(self, spec: ModelSpec, job_ids: list[str], timeout_s: float) -> dict[str, str]:
        """The replica's answer for a batch, given up after `timeout_s`, not counting time Redis
        was unreachable (the replica waits for Redis then, and its jobs must not run twice)."""
        call = asyncio.ensure_future(self.dispatch(spec, job_ids))
        started, outage = time.monotonic(), self.outages.total()
        while True:
            deadline = started + timeout_s + (self.outages.total() - outage)
            done, _ = await asyncio.wait({call}, timeout=max(0.0, deadline - time.monotonic()))
            if done:
                return call.result()
            if time.monotonic() >= started + timeout_s + (self.outages.total() - outage):
                call.cancel()
                raise TimeoutError(f"no answer in {timeout_s:.0f} s")

    async def _replica_lost(self, queue: _ModelQueue, batch: list[_Entry]) -> None:
        """Each job of a batch whose replica was lost runs once more (first in its user's line);
        a job that had already been started twice fails with a message that says why. Each
        entry is settled as soon as Redis answers."""
        for entry in batch:
            await self._until_redis_answers(lambda e=entry: self._lost_one(queue, e))  # type: ignore[misc]

    async def _lost_one(self, queue: _ModelQueue, entry: _Entry) -> None:
        job = await self.store.job(entry.job_id)
        if job is None or job["state"] in TERMINAL:
            await self._ack(entry)
        elif job.get("attempts", 0) >= MAX_ATTEMPTS:
            message = f"the model replica was lost while running this job ({MAX_ATTEMPTS} times); not retried"
            await self.store.transition(entry.job_id, "failed", {"message": message}, error=message)
            await self._ack(entry)
        elif await self.store.requeue(entry.job_id, queue.spec.name, "the model replica was lost"):
            queue.users.setdefault(entry.user, deque()).appendleft(entry)
            queue.users.move_to_end(entry.user, last=False)
        else:
            await self._ack(entry)

    async def _ack(self, *entries: _Entry) -> None:
        await self.store.ack(list(entries))
        for entry in entries:
            self.queues[entry.model].done(entry)


def ray_dispatch() -> Dispatch:
    """Dispatch through each model's Ray Serve deployment handle."""
    from ray import serve

    handles: dict[str, object] = {}

    async def dispatch(spec: ModelSpec, job_ids: list[str]) -> dict[str, str]:
        handle = handles.get(spec.name)
        if handle is None:
            handle = serve.get_deployment_handle(spec.deployment, app_name=spec.deployment)
            handles[spec.name] = handle
        try:
            result: dict[str, str] = await handle.run_batch.remote(job_ids)  # type: ignore[attr-defined]
        except BaseException:
            # A call that failed or timed out may have left the handle's router waiting on a
            # replica that is gone: the next batch gets a fresh handle.
            handles.pop(spec.name, None)
            raise
        return result

    return dispatch
