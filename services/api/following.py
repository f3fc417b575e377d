"""Many jobs' events followed together, for one websocket: one blocking read of Redis for all of
them (not one per job, no polling), woken through a waker stream when a job joins. The job
socket (/v1/socket) and a batch's event stream (/v1/batches/{id}/events) send through it.

    followed = FollowedJobs(store, inline_bytes, send)    # send(event, result_bytes | None)
    await followed.add(job_id)                             # its events from the first on
    await followed.drained()                               # every job added so far has ended
    followed.stop()
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import WebSocketDisconnect
from nnfabric.protocol import TERMINAL, JobEvent
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..common.store import Store

log = logging.getLogger("nnfabric.api")
_BLOCK_MS = 15_000
_READ_BYTES = 16 << 20  # inline results read from Redis at once, for one socket

# (the event, tagged with its job; a completed job's result envelope when it goes inline)
Send = Callable[[dict[str, Any], bytes | None], Awaitable[None]]


class FollowedJobs:
    """Each job's events go to `send` in order until its final one, with its result (up to
    `inline_bytes`; 0: never) beside a `completed` event. A follower that fails is logged; a
    client then learns its jobs' ends from GET /v1/jobs/{id}, so no job is waited on forever."""

    def __init__(self, store: Store, inline_bytes: int, send: Send) -> None:
        self.store, self.inline_bytes, self.send = store, inline_bytes, send
        self.jobs: set[str] = set()  # every job added (a socket checks cancels against it)
        self.failed = False  # following stopped on an error: the jobs' ends may not all have been sent
        self._cursors: dict[str, str] = {}  # jobs still followed -> their last event sent
        self._waker = uuid.uuid4().hex
        self._waker_cursor = "0-0"
        self._joined = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._waking = False
        self._wakes: set[asyncio.Task[None]] = set()

    async def add(self, job_id: str) -> None:
        self.jobs.add(job_id)
        self._cursors[job_id] = "0-0"
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        self._joined.set()
        if not self._waking:  # jobs added in one burst share one wake
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake_reader)

    def _wake_reader(self) -> None:
        """End a read blocked on the jobs followed so far: the next one takes the new jobs in."""
        self._waking = False
        task = asyncio.create_task(self.store.wake(self._waker))
        self._wakes.add(task)
        task.add_done_callback(self._woken)

    def _woken(self, task: asyncio.Task[None]) -> None:
        self._wakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("following jobs: could not wake the reader (%s)", type(task.exception()).__name__)

    async def drained(self) -> None:
        """Until every job added so far has ended (or following them failed: see `failed`)."""
        await self._idle.wait()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        retry = 0.1
        try:
            while True:
                if not self._cursors:
                    self._idle.set()
                    self._joined.clear()
                    await self._joined.wait()
                try:
                    found, self._waker_cursor = await self.store.events_of_many(
                        dict(self._cursors), self._waker, self._waker_cursor, _BLOCK_MS
                    )
                    retry = 0.1
                    for group in self._groups(found):
                        results = await self._inline_results(group)
                        for job_id, events in group.items():
                            await self._forward(job_id, events, results.get(job_id))
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("following jobs: Redis unreachable (%s); retrying", type(exc).__name__)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, 2.0)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away
        except Exception:
            self.failed = True
            log.exception("following jobs failed")
        finally:
            self._idle.set()

    def _inline_size(self, job_id: str, events: list[JobEvent]) -> int:
        """The size of the job's result if it goes inline after these events, else 0."""
        if job_id not in self._cursors:
            return 0
        sizes = [int(e.get("bytes") or 0) for e in events if e["type"] == "completed"]
        return next((size for size in sizes if 0 < size <= self.inline_bytes), 0)

    def _groups(self, found: dict[str, list[JobEvent]]) -> list[dict[str, list[JobEvent]]]:
        """The jobs read, in groups whose inline results together stay under _READ_BYTES (at
        least one job each): results are read a group at a time and sent before the next group's
        are read, so one socket holds at most that much at once, however many jobs ended."""
        groups: list[dict[str, list[JobEvent]]] = [{}]
        held = 0
        for job_id, events in found.items():
            size = self._inline_size(job_id, events)
            if groups[-1] and held + size > _READ_BYTES:
                groups.append({})
                held = 0
            groups[-1][job_id] = events
            held += size
        return groups

    async def _inline_results(self, group: dict[str, list[JobEvent]]) -> dict[str, bytes | None]:
        """The results small enough to go inline of the group's jobs that completed, read together."""
        ids = [job_id for job_id, events in group.items() if self._inline_size(job_id, events)]
        return dict(zip(ids, await self.store.results(ids), strict=True)) if ids else {}

    async def _forward(self, job_id: str, events: list[JobEvent], result: bytes | None) -> None:
        for event in events:
            if job_id not in self._cursors:
                return
            self._cursors[job_id] = event["id"]
            data = result if event["type"] == "completed" else None  # None: it went to the result store
            await self.send({"job": job_id, **event, **({"inline": True} if data else {})}, data)
            if event["type"] in TERMINAL:
                del self._cursors[job_id]
