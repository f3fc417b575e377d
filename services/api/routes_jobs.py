"""/v1/jobs: submit an envelope, read state and result, cancel, and follow events on a websocket."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from nnfabric.graph.json_form import result_to_json
from nnfabric.protocol import TERMINAL, CancelReply, JobRecord, SubmitReply

from ..common.result_store import ResultStore
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .deps import CatalogDep, KeyDep, SettingsDep, StoreDep
from .errors import ApiError, responses
from .intake import ENVELOPE_BODY, accept, admit, read_envelope
from .sockets import StreamSocket, until_disconnected

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

@router.post(
    "",
    status_code=202,
    openapi_extra=ENVELOPE_BODY,
    responses=responses(401, 403, 404, 413, 422, 429, 503),
)
async def submit(
    request: Request, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> SubmitReply:
    """Validate a job envelope against the model and enqueue it; answers at once with its id."""
    await admit(key, store)
    header, blob, body = await read_envelope(request, settings)
    return await accept(header, blob, body, key, store, catalog, settings)


@router.get("", responses=responses(401, 429))
async def list_jobs(key: KeyDep, store: StoreDep, limit: int = Query(20, ge=1, le=200)) -> list[JobRecord]:
    """The caller's recent jobs, newest first."""
    return await store.recent_jobs(limit, user=key.user)


async def _own_job(job_id: str, key: ApiKey, store: Store) -> JobRecord:
    job = await store.job(job_id) if len(job_id) <= 64 else None
    if job is None or job["user"] != key.user:
        raise ApiError(404, f"no job {job_id[:64]!r}")  # another user's job is indistinguishable from none
    return job


@router.get("/{job_id}", responses=responses(401, 404, 429))
async def status(job_id: str, key: KeyDep, store: StoreDep) -> JobRecord:
    """The job's state, queue position (while queued), times and error."""
    return await _own_job(job_id, key, store)


@router.get(
    "/{job_id}/result",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/ResultJSON"}},
            },
            "description": "the saved values: a result envelope (nnfabric.result/1), or JSON when the "
            "request says `Accept: application/json`",
        },
        **responses(401, 404, 409, 429),
    },
)
async def result(job_id: str, request: Request, key: KeyDep, store: StoreDep) -> Response:
    """The saved values of a completed job: binary by default, JSON on `Accept: application/json`."""
    job = await _own_job(job_id, key, store)
    if job["state"] != "completed":
        raise ApiError(409, f"job is {job['state']}; the result exists once it has completed", state=job["state"])
    wants_json = _wants_json(request.headers.get("accept", ""))
    name = await store.result_file(job_id)
    if name is not None:
        # A large result, on the result store: streamed from disk, with Range (a dropped
        # download resumes where it stopped), under the same ownership check and TTL.
        settings: Settings = request.app.state.settings
        path = ResultStore(settings.result_store_dir).path(name)
        if path is None:
            raise ApiError(404, "the result has expired")
        if not wants_json:
            return _LargeFile(path, media_type="application/octet-stream")
        data: bytes | None = await run_in_threadpool(path.read_bytes)
    else:
        data = await store.result(job_id)
    if data is None:
        raise ApiError(404, "the result has expired")
    if wants_json:
        values = await run_in_threadpool(result_to_json, data)
        return JSONResponse({**values, "names": job.get("meta", {}).get("names", {})})
    return Response(data, media_type="application/octet-stream")


class _LargeFile(FileResponse):
    # Starlette reads files in 64 KiB chunks: each costs a thread hop and a send, which is the
    # download's limit for results of hundreds of MiB. 4 MiB chunks keep it near the socket's speed.
    chunk_size = 4 << 20


def _wants_json(accept: str) -> bool:
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "application/json" in kinds and "application/octet-stream" not in kinds


@router.delete("/{job_id}", status_code=202, responses=responses(401, 404, 409, 429))
async def cancel(job_id: str, key: KeyDep, store: StoreDep) -> CancelReply:
    """Cancel a job that has not ended."""
    job = await _own_job(job_id, key, store)
    if job["state"] in TERMINAL or not await store.transition(job_id, "cancelled", {"by": "user"}):
        raise ApiError(409, f"job already {job['state']}", state=job["state"])
    return {"id": job_id, "state": "cancelled"}


@router.websocket("/{job_id}/events")
async def events(websocket: WebSocket, job_id: str, after: str = "0-0", result: str = "") -> None:
    """The job's events from `after` on, as JSON text frames, until a final one. With
    `result=inline`, a `completed` event says `"inline": true` when the result (up to
    NNFABRIC_INLINE_RESULT_BYTES) follows it as one binary frame; with `result=json`, it follows
    as one JSON text frame `{"type": "result", "values": ...}`."""
    opened = await StreamSocket.open(websocket)
    if opened is None:
        return
    store = opened.store
    if not _EVENT_ID.match(after):
        await opened.refuse(4400, "after= must be an event id such as 0-0")
        return
    job = await store.job(job_id) if len(job_id) <= 64 else None
    if job is None or job["user"] != opened.key.user:
        await opened.refuse(4404, "no such job")
        return
    if not await opened.take_slot():
        return
    try:
        await _stream(opened, job_id, after, result)
    finally:
        await opened.release()  # also when the server cancels this handler: the slot must not leak


async def _stream(opened: StreamSocket, job_id: str, after: str, inline: str) -> None:
    """Send events until a final one; stop as soon as the client goes away (its stream slot is
    then free again, even while the job waits in the queue)."""
    await opened.accept()
    sender = asyncio.create_task(_send_events(opened, job_id, after, inline))
    watcher = asyncio.create_task(until_disconnected(opened.websocket))
    try:
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, watcher):
            task.cancel()
        # (wait, not gather: if this handler is cancelled meanwhile, the CancelledError it raises
        # is the handler's own, which the server's cancel scope recognises and absorbs)
        await asyncio.wait({sender, watcher})


async def _send_events(opened: StreamSocket, job_id: str, cursor: str, inline: str) -> None:
    websocket, store = opened.websocket, opened.store
    limit = websocket.app.state.settings.inline_result_bytes if inline in ("inline", "json") else 0
    as_json = inline == "json"
    try:
        async for event in store.follow(job_id, cursor, block_ms=15_000):
            data = None
            if event["type"] == "completed" and 0 < int(event.get("bytes") or 0) <= limit:
                data = await store.result(job_id)
            await websocket.send_json({**event, **({"inline": True} if data else {})})
            if event["type"] in TERMINAL:
                if data and as_json:
                    values = await run_in_threadpool(result_to_json, data)
                    await websocket.send_json({"type": "result", **values})
                elif data:
                    await websocket.send_bytes(data)
                await opened.close()
                return
    except (WebSocketDisconnect, RuntimeError):
        return
