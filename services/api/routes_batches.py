"""Many jobs in one request, with one event stream for all of them (for HTTP callers; the Python
client sends a sweep's jobs over /v1/socket).

    POST /v1/jobs/batch           {"jobs": [job, ...]}  ->  {"batch", "events", "jobs": [per job]}
    WS   /v1/batches/{id}/events  every accepted job's events, tagged {"job": id, ...}, then closed

Each job is still its own job: validated, rate limited, capped (`max_active`), scheduled with
fair share, failed and stored on its own. A job the key's caps refuse comes back as its own 429
item (with `retry_after`): send it again once some of the batch's jobs have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from nnfabric.graph.json_form import envelopes_from_batch, result_to_json
from nnfabric.graph.validate import GraphError, Limits
from nnfabric.protocol import BatchItem, BatchReply
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..common.settings import Settings
from ..common.store import ApiKey
from .deps import CatalogDep, KeyDep, SettingsDep, StoreDep
from .errors import ApiError, InvalidJob, responses
from .following import FollowedJobs
from .intake import accept, admit, parse_envelope, read_body
from .sockets import StreamSocket, until_disconnected

router = APIRouter(tags=["jobs"])
_BATCH_ID = re.compile(r"^[0-9a-f]{32}$")

BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": 'Up to NNFABRIC_MAX_BATCH_JOBS jobs: {"jobs": [job, ...]}, each job in the JSON form '
        "POST /v1/jobs takes. The whole body is held to one job's size and parsing limits.",
        "content": {"application/json": {"schema": {"type": "object", "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobJSON"}}}}}},
    }
}  # fmt: skip


@router.post("/v1/jobs/batch", status_code=202, openapi_extra=BATCH_BODY, responses=responses(401, 413, 415, 422, 429))
async def submit_batch(
    request: Request, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> BatchReply:
    """Validate and enqueue each job; answers at once with each one's id or refusal, in order."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, 'a batch is JSON: {"jobs": [job, ...]} with Content-Type: application/json')
    body = await read_body(request, settings.max_envelope_bytes)
    limits = Limits(max_envelope_bytes=settings.max_envelope_bytes)
    try:
        envelopes = await run_in_threadpool(envelopes_from_batch, body, limits, settings.max_batch_jobs)
    except GraphError as exc:
        raise InvalidJob(exc) from None
    items: list[BatchItem] = []
    reachable = True
    for index, envelope in enumerate(envelopes):
        if reachable:
            try:
                items.append(await _submit_one(index, envelope, key, request))
                continue
            except (RedisConnectionError, RedisTimeoutError):
                reachable = False  # the jobs accepted so far keep their ids; the rest wait for Redis
        detail = "the job store is unreachable for a moment; send this job again shortly"
        items.append({"index": index, "status": 503, "detail": detail, "retry_after": 2.0})
    job_ids = [item["id"] for item in items if "id" in item]
    batch_id = uuid.uuid4().hex
    try:
        await store.save_batch(batch_id, key.user, job_ids)
    except (RedisConnectionError, RedisTimeoutError):
        if not job_ids:
            raise  # nothing accepted: a plain 503, send it all again
        # The accepted jobs run: their ids matter more than one stream to follow them on.
        return {"batch": None, "accepted": len(job_ids), "events": None, "jobs": items}
    return {"batch": batch_id, "accepted": len(job_ids), "events": f"/v1/batches/{batch_id}/events", "jobs": items}


async def _submit_one(index: int, envelope: bytes | GraphError, key: ApiKey, request: Request) -> BatchItem:
    state = request.app.state
    try:
        if isinstance(envelope, GraphError):
            raise InvalidJob(envelope)
        await admit(key, state.store)
        header, blob, body = await parse_envelope(envelope, False, state.settings)
        reply = await accept(header, blob, body, key, state.store, state.catalog, state.settings)
    except ApiError as exc:
        retry = (exc.headers or {}).get("Retry-After")
        refused: dict[str, Any] = {"index": index, "status": exc.status, "detail": exc.message, **exc.extra}
        if retry:
            refused["retry_after"] = float(retry)
        return refused  # type: ignore[return-value]
    return {"index": index, "id": reply["id"], "position": reply["position"]}


@router.websocket("/v1/batches/{batch_id}/events")
async def batch_events(websocket: WebSocket, batch_id: str, result: str = "") -> None:
    """Every job of the batch: its events as JSON text frames `{"job": id, "type", ...}` until
    each has ended, then the server closes (1000). With `result=inline`, a `completed` event
    with `"inline": true` is followed by one binary frame: the job id (32 ASCII bytes), then its
    result envelope; with `result=json`, by one text frame `{"type": "result", "job", "values"}`.
    Larger results: GET /v1/jobs/{id}/result. One of the key's event streams while open."""
    opened = await StreamSocket.open(websocket)
    if opened is None:
        return
    batch = await opened.store.batch(batch_id) if _BATCH_ID.match(batch_id) else None
    if batch is None or batch["user"] != opened.key.user:
        await opened.refuse(4404, "no such batch")
        return
    if not await opened.take_slot():
        return
    try:
        await opened.accept()
        settings: Settings = websocket.app.state.settings
        inline = settings.inline_result_bytes if result in ("inline", "json") else 0
        followed = FollowedJobs(opened.store, inline, _sender(websocket, as_json=result == "json"))
        watcher = asyncio.create_task(until_disconnected(websocket))
        try:
            for job_id in batch["jobs"]:
                await followed.add(job_id)
            drained = asyncio.create_task(followed.drained())
            done, _ = await asyncio.wait({drained, watcher}, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
        finally:
            followed.stop()
            watcher.cancel()
        if watcher not in done:  # every job ended (or following them failed): the server ends the stream
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                if followed.failed:
                    await opened.close(1011, "following the jobs failed; read their states from GET /v1/jobs/{id}")
                else:
                    await opened.close()
    finally:
        await opened.release()


def _sender(websocket: WebSocket, as_json: bool) -> Any:
    async def send(event: dict[str, Any], data: bytes | None) -> None:
        await websocket.send_json(event)
        if data is None:
            return
        if as_json:
            values = await run_in_threadpool(result_to_json, data)
            await websocket.send_json({"type": "result", "job": event["job"], **values})
        else:
            await websocket.send_bytes(event["job"].encode() + data)

    return send

