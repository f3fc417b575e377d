"""/v1/jobs: submit an envelope, read state and result, cancel, and follow events on a websocket."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from nnfabric.graph.codec import graphs_from_header, split_envelope, version_message
from nnfabric.graph.ir import SCHEMA, Graph
from nnfabric.graph.validate import GraphError, Limits, check_safetensors, validate_session

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import TERMINAL, ApiKey, Store
from .deps import get_catalog, get_settings, get_store, require_key, websocket_key
from .errors import ApiError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@functools.lru_cache(maxsize=64)
def _module_paths(structure: str) -> frozenset[str]:
    """A model's module paths, parsed once per published structure rather than per request."""
    from nnfabric.tracing.tree import ModuleTree

    return frozenset(ModuleTree.from_json(json.loads(structure)).paths())


def _line(graphs: list[Graph], trace: int | None, node: int | None) -> dict[str, Any] | None:
    graph = graphs[trace or 0] if 0 <= (trace or 0) < len(graphs) else None
    if graph is None or node is None or not 0 <= node < len(graph.nodes):
        return None
    line = graph.nodes[node].line
    return None if line is None else {"file": line.file, "line": line.line, "code": line.code}


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


@router.post("", status_code=202)
async def submit(
    request: Request,
    key: ApiKey = Depends(require_key),
    store: Store = Depends(get_store),
    catalog: Catalog = Depends(get_catalog),
    settings: Settings = Depends(get_settings),
) -> dict[str, Any]:
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_envelope_bytes:
        raise ApiError(413, f"request of {declared} bytes exceeds the limit of {settings.max_envelope_bytes}")
    body = await request.body()
    if len(body) > settings.max_envelope_bytes:
        raise ApiError(413, f"request of {len(body)} bytes exceeds the limit of {settings.max_envelope_bytes}")
    try:
        header, blob = split_envelope(body, Limits(max_header_bytes=settings.max_envelope_bytes))
    except GraphError as exc:
        raise ApiError(422, str(exc)) from None
    if header.get("schema") != SCHEMA:
        raise ApiError(422, version_message(header.get("schema"), SCHEMA))
    name = header.get("model")
    spec = catalog.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ApiError(404, f"unknown model {name!r}; GET /v1/models lists the hosted ones")
    if not key.allows(spec.name):
        raise ApiError(403, f"this API key may not use model {spec.name!r}")
    state = await store.model(spec.name, "state", "structure")
    if state.get("state") != "ready" or "structure" not in state:
        raise ApiError(
            503, f"model {spec.name!r} is not ready ({state.get('state', 'not started')})", headers={"Retry-After": "5"}
        )
    limits = Limits(
        max_nodes=spec.limits.max_nodes,
        max_tensor_bytes=spec.limits.max_tensor_bytes,
        max_new_tokens=spec.limits.max_new_tokens,
        max_header_bytes=settings.max_envelope_bytes,
    )
    graphs: list[Graph] = []
    try:
        graphs = graphs_from_header(header, limits)
        tensors = check_safetensors(blob, limits)
        validate_session(graphs, limits, tensor_names=set(tensors), module_paths=_module_paths(state["structure"]))
    except GraphError as exc:
        status = 413 if "exceed" in str(exc) else 422
        line = _line(graphs, exc.trace, exc.node)
        raise ApiError(status, str(exc), node=exc.node, trace=exc.trace, line=line) from None
    job_id = uuid.uuid4().hex
    meta = {
        "kind": graphs[0].kind if len(graphs) == 1 else "session",
        "traces": len(graphs),
        "nodes": sum(len(g.nodes) for g in graphs),
        "names": _names(header.get("names")),
    }
    position = await store.submit(job_id, key.user, spec.name, body, meta)
    return {
        "id": job_id,
        "state": "queued",
        "model": spec.name,
        "position": position,
        "status": f"/v1/jobs/{job_id}",
        "events": f"/v1/jobs/{job_id}/events",
        "result": f"/v1/jobs/{job_id}/result",
    }


@router.get("")
async def list_jobs(
    limit: int = 20, key: ApiKey = Depends(require_key), store: Store = Depends(get_store)
) -> list[dict[str, Any]]:
    """The caller's recent jobs, newest first."""
    return await store.recent_jobs(max(1, min(limit, 200)), user=key.user)


async def _own_job(job_id: str, key: ApiKey, store: Store) -> dict[str, Any]:
    job = await store.job(job_id)
    if job is None or job["user"] != key.user:
        raise ApiError(404, f"no job {job_id!r}")  # another user's job is indistinguishable from none
    return job


@router.get("/{job_id}")
async def status(job_id: str, key: ApiKey = Depends(require_key), store: Store = Depends(get_store)) -> dict[str, Any]:
    job = await _own_job(job_id, key, store)
    for field in ("error_node", "error_trace"):
        if job.get(field) not in (None, "", "None"):
            job[field] = int(job[field])
    return job


@router.get("/{job_id}/result")
async def result(job_id: str, key: ApiKey = Depends(require_key), store: Store = Depends(get_store)) -> Response:
    job = await _own_job(job_id, key, store)
    if job["state"] != "completed":
        raise ApiError(409, f"job is {job['state']}; the result exists once it has completed", state=job["state"])
    data = await store.result(job_id)
    if data is None:
        raise ApiError(404, "the result has expired")
    return Response(data, media_type="application/octet-stream")


@router.delete("/{job_id}", status_code=202)
async def cancel(job_id: str, key: ApiKey = Depends(require_key), store: Store = Depends(get_store)) -> dict[str, Any]:
    job = await _own_job(job_id, key, store)
    if job["state"] in TERMINAL or not await store.transition(job_id, "cancelled", {"by": "user"}):
        raise ApiError(409, f"job already {job['state']}", state=job["state"])
    return {"id": job_id, "state": "cancelled"}


@router.websocket("/{job_id}/events")
async def events(websocket: WebSocket, job_id: str, after: str = "0-0", result: str = "") -> None:
    """The job's events from `after` on, as JSON text frames, until a final one. With
    `result=inline`, a `completed` event says `"inline": true` when the result (up to
    NNFABRIC_INLINE_RESULT_BYTES) follows it as one binary frame."""
    key = await websocket_key(websocket)
    store: Store = websocket.app.state.store
    if key is None:
        await websocket.close(code=4401, reason="unknown or missing API key")
        return
    job = await store.job(job_id)
    if job is None or job["user"] != key.user:
        await websocket.close(code=4404, reason=f"no job {job_id!r}")
        return
    limit = websocket.app.state.settings.inline_result_bytes if result == "inline" else 0
    await websocket.accept()
    cursor = after
    try:
        while True:
            batch = await store.events(job_id, cursor, block_ms=1000)
            for event_id, event in batch:
                data = None
                if event["type"] == "completed" and 0 < int(event.get("bytes") or 0) <= limit:
                    data = await store.result(job_id)
                await websocket.send_json({"id": event_id, **event, **({"inline": True} if data else {})})
                cursor = event_id
                if event["type"] in TERMINAL:
                    if data:
                        await websocket.send_bytes(data)
                    await websocket.close()
                    return
            if not batch:
                await asyncio.sleep(0)
    except WebSocketDisconnect:
        return
