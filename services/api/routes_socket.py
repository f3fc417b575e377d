"""/v1/socket: one websocket per client connection that submits jobs and receives their events
and results: one round trip per job, for clients that want it (POST /v1/jobs plus each job's
events websocket stays the way for plain HTTP callers).

Protocol (nnfabric.remote.socket speaks it):

- client -> server, binary frame: a job envelope, exactly as the body of POST /v1/jobs.
- server -> client, per submission in order: `{"type": "accepted", "seq": n, "id", "position"}`
  or `{"type": "rejected", "seq": n, "status", "detail"}` (the HTTP status and message POST
  would give).
- server -> client, per accepted job: its events as `{"job": id, "type", ...}` until a final
  one; a `completed` event with `"inline": true` is followed by one binary frame: the job id
  (32 ASCII bytes) then the result envelope. Larger results: GET /v1/jobs/{id}/result.
- client -> server, text frame `{"cancel": id}`: cancels one of the socket's jobs.

Events come from one blocking read of Redis for all of a socket's jobs (no polling, no read per
job). A socket counts as one of the key's event streams; its jobs count against the key's caps
and rate limit as any others do. The Python client submits and follows its jobs on one socket
per fabric connection (nnfabric.remote.socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from nnfabric.protocol import TERMINAL
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .errors import ApiError
from .intake import accept, parse_envelope
from .sockets import StreamSocket

router = APIRouter(tags=["jobs"])
log = logging.getLogger("nnfabric.api")
_FOLLOW_BLOCK_MS = 15_000


@router.websocket("/v1/socket")
async def socket(websocket: WebSocket) -> None:
    opened = await StreamSocket.open(websocket)
    if opened is None or not await opened.take_slot():
        return
    try:
        await opened.accept()
        await _serve(websocket, opened.key, opened.store)
    finally:
        await opened.release()


async def _serve(websocket: WebSocket, key: ApiKey, store: Store) -> None:
    settings: Settings = websocket.app.state.settings
    catalog: Catalog = websocket.app.state.catalog
    send = asyncio.Lock()  # frames of different jobs never interleave mid-message

    async def reply(message: dict[str, Any], data: bytes | None = None) -> None:
        async with send:
            await websocket.send_json(message)
            if data is not None:
                await websocket.send_bytes(data)

    followed = _Followed(store, settings, reply)
    seq = 0
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is None:
                await _control(message.get("text") or "", store, followed.jobs, reply)
                continue
            seq += 1
            try:
                wait = await store.count_submit(key)
                if wait:
                    raise ApiError(429, f"rate limit of {key.rate_limit} jobs a minute reached")
                header, blob, body = await parse_envelope(message["bytes"], False, settings)
                accepted = await accept(header, blob, body, key, store, catalog, settings)
            except ApiError as exc:
                await reply({"type": "rejected", "seq": seq, "status": exc.status, "detail": exc.message, **exc.extra})
                continue
            await reply({"type": "accepted", "seq": seq, "id": accepted["id"], "position": accepted["position"]})
            await followed.add(accepted["id"])
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        followed.stop()


async def _control(text: str, store: Store, mine: set[str], reply: Any) -> None:
    try:
        request = json.loads(text)
        job_id = request["cancel"]
    except (ValueError, TypeError, KeyError):
        await reply({"type": "error", "detail": 'text frames are {"cancel": job id}; jobs are binary frames'})
        return
    if not isinstance(job_id, str) or job_id not in mine:
        await reply({"type": "error", "detail": "not a job of this socket"})
        return
    await store.transition(job_id, "cancelled", {"by": "user"})


class _Followed:
    """The socket's jobs, followed together: one blocking read of Redis for all of them (not one
    per job), interrupted through a waker stream when a job joins. Each job's events go out
    until its final one, its small result inline. A follower that fails is logged; the client
    then learns its jobs' ends from GET /v1/jobs/{id} (it asks after a quiet spell)."""

    def __init__(self, store: Store, settings: Settings, reply: Any) -> None:
        self.store, self.settings, self.reply = store, settings, reply
        self.jobs: set[str] = set()  # every job submitted on this socket (cancels are checked against it)
        self.cursors: dict[str, str] = {}  # jobs still followed -> their last event sent
        self.waker = uuid.uuid4().hex
        self.waker_cursor = "0-0"
        self.joined = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def add(self, job_id: str) -> None:
        self.jobs.add(job_id)
        self.cursors[job_id] = "0-0"
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        self.joined.set()
        await self.store.wake(self.waker)  # a read blocked on the others ends, and takes it in

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        retry = 0.1
        while True:
            if not self.cursors:
                self.joined.clear()
                await self.joined.wait()
            try:
                found, self.waker_cursor = await self.store.events_of_many(
                    dict(self.cursors), self.waker, self.waker_cursor, _FOLLOW_BLOCK_MS
                )
                retry = 0.1
                for job_id, events in found.items():
                    await self._send(job_id, events)
            except (WebSocketDisconnect, RuntimeError):
                return  # the client went away
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("following a socket's jobs: Redis unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(retry)
                retry = min(retry * 2, 2.0)
            except Exception:
                log.exception("following a socket's jobs failed")
                return

    async def _send(self, job_id: str, events: list[Any]) -> None:
        for event in events:
            if job_id not in self.cursors:
                return
            self.cursors[job_id] = event["id"]
            data = None
            if event["type"] == "completed" and 0 < int(event.get("bytes") or 0) <= self.settings.inline_result_bytes:
                data = await self.store.result(job_id)  # None when it went to the result store
            await self.reply({"job": job_id, **event, **({"inline": True} if data else {})},
                             job_id.encode() + data if data else None)  # fmt: skip
            if event["type"] in TERMINAL:
                del self.cursors[job_id]
