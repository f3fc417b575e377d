"""The gateway's intake of a job: the request body read within its limit, either form (binary
envelope or JSON) framed as the one binary envelope, validated against the model as published
(its module tree, its limits, the edits it names), and enqueued. Every route that takes a job
(POST /v1/jobs, the job socket, edits, the compiled high-level routes) comes through here.

    header, blob, body = await read_envelope(request, settings)
    reply = await accept(header, blob, body, key, store, catalog, settings)
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from nnfabric.graph.codec import encode_envelope, graph_to_json, graphs_from_header, split_envelope, validate_request
from nnfabric.graph.edits import MAX_EDITS_PER_JOB
from nnfabric.graph.ir import Graph
from nnfabric.graph.json_form import envelope_from_json
from nnfabric.graph.merging import apply_edits
from nnfabric.graph.tensor_blob import merge_blobs
from nnfabric.graph.tree import ModuleTree
from nnfabric.graph.validate import GraphError, LimitExceeded, Limits
from nnfabric.protocol import JobMeta, SubmitReply

from ..common.catalog import Catalog, ModelSpec, limits_for
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .errors import ApiError, InvalidJob

T = TypeVar("T")

ENVELOPE_BODY = {
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


async def read_body(request: Request, limit: int) -> bytes:
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


async def read_envelope(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, tensor blob, binary envelope) of a request in either form, framing checked."""
    body = await read_body(request, settings.max_envelope_bytes)
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
            body = await _off_loop(len(body), envelope_from_json, body, base)  # then the one binary path
        header, blob = await _off_loop(len(body), split_envelope, body, base)
    except GraphError as exc:
        raise InvalidJob(exc) from None
    return header, blob, body


async def _validated(
    header: dict[str, Any], blob: bytes, body: bytes, spec: ModelSpec, key: ApiKey, store: Store, settings: Settings
) -> tuple[dict[str, Any], bytes, list[Graph]]:
    """The job checked against the model as it is published now (ready, its module tree, its
    limits), with the edits it names merged in: (header, envelope, graphs) to enqueue."""
    state = await store.published(spec.name)
    if state.get("state") != "ready" or "structure" not in state:
        raise ApiError(
            503, f"model {spec.name!r} is not ready ({state.get('state', 'not started')})", headers={"Retry-After": "5"}
        )
    limits = limits_for(spec, settings)
    if len(body) > limits.max_envelope_bytes:
        raise InvalidJob(LimitExceeded(f"request of {len(body)} bytes exceeds the limit"))
    paths = module_paths(state["structure"])
    try:
        graphs = await _off_loop(len(body), validate_request, header, blob, limits, paths)
        if "edits" in header:
            edits = await stored_edits(header["edits"], key, spec.name, store)
            header, blob, body, graphs = await run_in_threadpool(with_edits, header, blob, graphs, edits, limits, paths)
    except GraphError as exc:
        raise InvalidJob(exc) from None
    return header, body, graphs


async def admit(key: ApiKey, store: Store) -> None:
    """Before a job is read: refuse it (429) while the key has its `max_active` jobs queued or
    running, uncounted; else count it against the rate limit (refused jobs cost the sender too),
    or refuse it with 429 and when to come back."""
    wait = await store.admit(key)
    if wait < 0:
        raise _over_cap(key)
    if wait:
        raise ApiError(429, f"rate limit of {key.rate_limit} jobs a minute reached", headers={"Retry-After": str(wait)})


def _over_cap(key: ApiKey) -> ApiError:
    return ApiError(
        429, f"this key already has {key.max_active} jobs queued or running; wait for one to end", headers={"Retry-After": "1"}
    )


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
    header, body, graphs = await _validated(header, blob, body, spec, key, store, settings)
    job_id = uuid.uuid4().hex
    meta: JobMeta = {
        "kind": graphs[0].kind if len(graphs) == 1 else "session",
        "traces": len(graphs),
        "nodes": sum(len(g.nodes) for g in graphs),
        "names": _names(header.get("names")),
    }
    position = await store.submit(job_id, key, spec.name, body, dict(meta))
    if position is None:  # the cap filled while this job was read (admit() saw room)
        raise _over_cap(key)
    return {
        "id": job_id,
        "state": "queued",
        "model": spec.name,
        "position": position,
        "status": f"/v1/jobs/{job_id}",
        "events": f"/v1/jobs/{job_id}/events",
        "result": f"/v1/jobs/{job_id}/result",
    }


# Work on a request up to this size is done on the event loop: bounded by the size (a
# millisecond or so), it costs less there than the hand-off to a worker thread and back.
_INLINE_BYTES = 16 << 10


async def _off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread, or right here for a small request."""
    if size <= _INLINE_BYTES:
        return function(*args)
    return await run_in_threadpool(function, *args)


def _is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "application/json"
