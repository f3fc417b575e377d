"""/v1/socket: one websocket per client connection that submits jobs and receives their events
and results: one round trip per job, for clients that want it (POST /v1/jobs plus each job's
events websocket stays the way for plain HTTP callers).

Protocol (the test suite's `tests/support/job_socket.py` speaks it):

- client -> server, binary frame: a job envelope, exactly as the body of POST /v1/jobs.
- server -> client, per submission in order: `{"type": "accepted", "seq": n, "id", "position"}`
  or `{"type": "rejected", "seq": n, "status", "detail"}` (the HTTP status and message POST
  would give).
- server -> client, per accepted job: its events as `{"job": id, "type", ...}` until a final
  one; a `completed` event with `"inline": true` is followed by one binary frame: the job id
  (32 ASCII bytes) then the result envelope. Larger results: GET /v1/jobs/{id}/result.
- client -> server, text frame `{"cancel": id}`: cancels one of the socket's jobs.

Events come from blocking reads on Redis (no polling). A socket counts as one of the key's
event streams; its jobs count against the key's caps and rate limit as any others do.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

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
    followers: set[asyncio.Task[None]] = set()
    mine: set[str] = set()
    seq = 0

    async def reply(message: dict[str, Any], data: bytes | None = None) -> None:
        async with send:
            await websocket.send_json(message)
            if data is not None:
                await websocket.send_bytes(data)

    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is None:
                await _control(message.get("text") or "", key, store, mine, reply)
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
            job_id = accepted["id"]
            mine.add(job_id)
            await reply({"type": "accepted", "seq": seq, "id": job_id, "position": accepted["position"]})
            task = asyncio.create_task(_follow(job_id, store, settings, reply))
            followers.add(task)
            task.add_done_callback(followers.discard)
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        for task in followers:
            task.cancel()


async def _control(text: str, key: ApiKey, store: Store, mine: set[str], reply: Any) -> None:
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


async def _follow(job_id: str, store: Store, settings: Settings, reply: Any) -> None:
    """Send one job's events until a final one, its small result inline. A follower that fails
    is logged; the client then learns the job's end from GET /v1/jobs/{id} (it asks after a
    quiet spell), so no job is waited on forever."""
    try:
        async for event in store.follow(job_id, block_ms=_FOLLOW_BLOCK_MS):
            data = None
            if event["type"] == "completed" and 0 < int(event.get("bytes") or 0) <= settings.inline_result_bytes:
                data = await store.result(job_id)  # None when it went to the result store
            message = {"job": job_id, **event, **({"inline": True} if data else {})}
            await reply(message, job_id.encode() + data if data else None)
    except (WebSocketDisconnect, RuntimeError):
        return  # the client went away
    except Exception:
        log.exception("following job %s on a socket failed", job_id)
