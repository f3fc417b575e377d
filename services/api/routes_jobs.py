"""/v1/jobs: submit an envelope, read state and result, cancel, and follow events on a websocket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from nnfabric.graph.codec import encode_envelope, graph_to_json, graphs_from_header, split_envelope, validate_request
from nnfabric.graph.edits import MAX_EDITS_PER_JOB, apply_edits
from nnfabric.graph.ir import Graph
from nnfabric.graph.json_form import envelope_from_json, result_to_json
from nnfabric.graph.tensor_blob import merge_blobs
from nnfabric.graph.tree import ModuleTree
from nnfabric.graph.validate import GraphError, LimitExceeded, Limits
from nnfabric.protocol import TERMINAL, CancelReply, JobMeta, JobRecord, SubmitReply

from ..common.catalog import Catalog, limits_for
from ..common.result_store import ResultStore
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .deps import CatalogDep, KeyDep, SettingsDep, StoreDep
from .errors import ApiError, InvalidJob, responses
from .sockets import StreamSocket

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

_ENVELOPE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A job, in either form. Binary (what the Python client sends): b'NNFB', the JSON "
        "header's length (8 bytes, little endian), the UTF-8 JSON header (schema nnfabric.graph/1: model, "
        "graph or session, names), then a safetensors blob. JSON: the same header's fields, with tensors "
        "as {name: {dtype, shape, data (base64)}}. GET /v1/schema describes the graph.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/JobJSON"}},
        },
    }
}


@functools.lru_cache(maxsize=64)
def module_paths(structure: str) -> frozenset[str]:
    """A model's module paths, parsed once per published structure rather than per request."""
    return frozenset(ModuleTree.from_json(json.loads(structure)).paths())


async def stored_edits(ids: Any, key: ApiKey, model: str, store: Store) -> list[bytes]:
    """The envelopes of the edits a job names: the key's user's own, on this model."""
    if not isinstance(ids, list) or len(ids) > MAX_EDITS_PER_JOB or not all(isinstance(i, str) for i in ids):
        raise ApiError(422, f"edits must be a list of up to {MAX_EDITS_PER_JOB} edit ids")
    payloads = await store.edit_payloads(key.user, model, ids)
    missing = [i for i, p in zip(ids, payloads, strict=True) if p is None]
    if missing:
        raise ApiError(
            422, f"no edit {missing[0][:40]!r} of yours on {model!r}; GET /v1/models/{model}/edits lists them"
        )
    return [p for p in payloads if p is not None]


def with_edits(
    header: dict[str, Any],
    blob: bytes,
    graphs: list[Graph],
    edits: list[bytes],
    limits: Limits,
    paths: frozenset[str],
) -> tuple[dict[str, Any], bytes, bytes, list[Graph]]:
    """The job with its named edits merged in (each applied first in every trace), validated
    again as a whole: the limits hold for the merged job."""
    pairs: list[tuple[Graph, str]] = []
    blobs = [(blob, "")]
    for index, payload in enumerate(edits):
        edit_header, edit_blob = split_envelope(payload, limits)
        pairs.append((graphs_from_header(edit_header, limits)[0], f"edit{index}_"))
        blobs.append((edit_blob, f"edit{index}_"))
    merged_graphs = [apply_edits(graph, pairs) for graph in graphs]
    merged = {k: v for k, v in header.items() if k not in ("edits", "graph", "session")}
    if "session" in header:
        merged["session"] = [graph_to_json(g) for g in merged_graphs]
    else:
        merged["graph"] = graph_to_json(merged_graphs[0])
    merged_blob = merge_blobs(blobs)
    body = encode_envelope(merged, merged_blob)
    if len(body) > limits.max_envelope_bytes:
        raise LimitExceeded(f"the job with its edits has {len(body)} bytes, over the limit of {limits.max_envelope_bytes}")
    return merged, merged_blob, body, validate_request(merged, merged_blob, limits, paths)


def _names(value: Any) -> dict[str, Any]:
    """The client's variable names for saved values (for reattached jobs); kept only if well formed."""
    if not isinstance(value, dict) or len(value) > 1000:
        return {}
    return {
        k: v
        for k, v in value.items()
        if isinstance(k, str) and len(k) <= 200
        and (isinstance(v, str) or (isinstance(v, list) and len(v) <= 10_000 and all(isinstance(i, str) for i in v)))
    }  # fmt: skip


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` (declared or streamed, chunked or not)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request of more than {limit} bytes exceeds the limit of {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "",
    status_code=202,
    openapi_extra=_ENVELOPE_BODY,
    responses=responses(401, 403, 404, 413, 422, 429, 503),
)
async def submit(
    request: Request, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> SubmitReply:
    """Validate a job envelope against the model and enqueue it; answers at once with its id."""
    wait = await store.count_submit(key)
    if wait:
        raise ApiError(429, f"rate limit of {key.rate_limit} jobs a minute reached", headers={"Retry-After": str(wait)})
    header, blob, body = await read_envelope(request, settings)
    return await accept(header, blob, body, key, store, catalog, settings)


async def read_envelope(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, tensor blob, binary envelope) of a request in either form, framing checked."""
    body = await _body(request, settings.max_envelope_bytes)
    return await parse_envelope(body, _is_json(request.headers.get("content-type", "")), settings)


async def parse_envelope(body: bytes, is_json: bool, settings: Settings) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, tensor blob, binary envelope) of a body already read within the size limit."""
    if len(body) > settings.max_envelope_bytes:
        raise ApiError(413, f"request of {len(body)} bytes exceeds the limit of {settings.max_envelope_bytes}")
    # Parsing and validating cost CPU in proportion to what a stranger sent: off the event loop,
    # so /healthz and everyone else's requests keep being answered meanwhile.
    base = Limits(max_envelope_bytes=settings.max_envelope_bytes)
    try:
        if is_json:
            body = await run_in_threadpool(envelope_from_json, body, base)  # then the one binary path
        header, blob = await run_in_threadpool(split_envelope, body, base)
    except GraphError as exc:
        raise InvalidJob(exc) from None
    return header, blob, body


async def accept(
    header: dict[str, Any],
    blob: bytes,
    body: bytes,
    key: ApiKey,
    store: Store,
    catalog: Catalog,
    settings: Settings,
) -> SubmitReply:
    """The one way into the queue, for envelopes and for jobs compiled from high-level routes:
    the model and the key's scope, readiness, validation with the model's limits, the key's caps."""
    name = header.get("model")
    spec = catalog.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ApiError(404, f"unknown model {str(name)[:100]!r}; GET /v1/models lists the hosted ones")
    if not key.allows(spec.name):
        raise ApiError(403, f"this API key may not use model {spec.name!r}")
    state = await store.model(spec.name, "state", "structure")
    if state.get("state") != "ready" or "structure" not in state:
        raise ApiError(
            503, f"model {spec.name!r} is not ready ({state.get('state', 'not started')})", headers={"Retry-After": "5"}
        )
    limits = limits_for(spec, settings)
    if len(body) > limits.max_envelope_bytes:
        raise InvalidJob(LimitExceeded(f"request of {len(body)} bytes exceeds the limit"))
    paths = module_paths(state["structure"])
    try:
        graphs = await run_in_threadpool(validate_request, header, blob, limits, paths)
    except GraphError as exc:
        raise InvalidJob(exc) from None
    if "edits" in header:
        edits = await stored_edits(header["edits"], key, spec.name, store)
        try:
            header, blob, body, graphs = await run_in_threadpool(
                with_edits, header, blob, graphs, edits, limits, paths
            )
        except GraphError as exc:
            raise InvalidJob(exc) from None
    job_id = uuid.uuid4().hex
    meta: JobMeta = {
        "kind": graphs[0].kind if len(graphs) == 1 else "session",
        "traces": len(graphs),
        "nodes": sum(len(g.nodes) for g in graphs),
        "names": _names(header.get("names")),
    }
    position = await store.submit(job_id, key, spec.name, body, dict(meta))
    if position is None:
        raise ApiError(
            429,
            f"this key already has {key.max_active} jobs queued or running; wait for one to end",
            headers={"Retry-After": "1"},
        )
    return {
        "id": job_id,
        "state": "queued",
        "model": spec.name,
        "position": position,
        "status": f"/v1/jobs/{job_id}",
        "events": f"/v1/jobs/{job_id}/events",
        "result": f"/v1/jobs/{job_id}/result",
    }


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


def _is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "application/json"


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
    watcher = asyncio.create_task(_until_disconnected(opened.websocket))
    try:
        await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, watcher):
            task.cancel()
        # (wait, not gather: if this handler is cancelled meanwhile, the CancelledError it raises
        # is the handler's own, which the server's cancel scope recognises and absorbs)
        await asyncio.wait({sender, watcher})


async def _until_disconnected(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass


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
