"""/v1/socket: one websocket per client connection that submits jobs and receives their events
and results: one round trip per job, for clients that want it (POST /v1/jobs plus each job's
events websocket stays the way for plain HTTP callers).

Protocol (nnfabric.remote.socket speaks it):

- client -> server, binary frame: a job envelope, exactly as the body of POST /v1/jobs.
- server -> client, per submission in order: `{"type": "accepted", "seq": n, "id", "position"}`
  or `{"type": "rejected", "seq": n, "status", "detail"}` (the HTTP status and message POST
  would give; `retry_after` in seconds where POST would say Retry-After: a 429 or 503).
- server -> client, per accepted job: its events as `{"job": id, "type", ...}` until a final
  one; a `completed` event with `"inline": true` is followed by one binary frame: the job id
  (32 ASCII bytes) then the result envelope. Larger results: GET /v1/jobs/{id}/result.
- client -> server, text frame `{"cancel": id}`: cancels one of the socket's jobs.

Events come from one blocking read of Redis for all of a socket's jobs (no polling, no read per
job). A socket counts as one of the key's event streams; its jobs count against the key's caps
and rate limit as any others do. The Python client submits and follows its jobs on one socket
(nnfabric.remote.sweep: a sweep's jobs, windowed to the key's cap).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .errors import ApiError
from .following import FollowedJobs
from .intake import accept, admit, parse_envelope
from .sockets import StreamSocket

router = APIRouter(tags=["jobs"])


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
    sending = asyncio.Lock()  # frames of different jobs never interleave mid-message

    async def reply(message: dict[str, Any], data: bytes | None = None) -> None:
        async with sending:
            await websocket.send_json(message)
            if data is not None:
                await websocket.send_bytes(data)

    async def send(event: dict[str, Any], data: bytes | None) -> None:
        await reply(event, event["job"].encode() + data if data else None)

    followed = FollowedJobs(store, settings.inline_result_bytes, send)
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
                await admit(key, store)
                header, blob, body = await parse_envelope(message["bytes"], False, settings)
                accepted = await accept(header, blob, body, key, store, catalog, settings)
            except ApiError as exc:
                retry = (exc.headers or {}).get("Retry-After")
                await reply({"type": "rejected", "seq": seq, "status": exc.status, "detail": exc.message, **exc.extra,
                             **({"retry_after": float(retry)} if retry else {})})  # fmt: skip
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
