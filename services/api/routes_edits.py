"""/v1/models/{name}/edits: persistent edits, registered for one user's own jobs on one model.

An edit is an envelope of one graph that only writes (no inputs, no saves; see
nnfabric.graph.edits). A job names the edits it wants (`"edits": [id, ...]` in its header) and the
gateway merges them into its graphs, so an edit touches only the rows of its owner's jobs, and
another user can neither see, name nor remove it.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from nnfabric.graph.codec import validate_request
from nnfabric.graph.edits import check_edit
from nnfabric.graph.validate import GraphError
from nnfabric.protocol import EditRecord

from ..common.catalog import ModelSpec, limits_for
from .deps import CatalogDep, KeyDep, SettingsDep, StoreDep
from .errors import ApiError, InvalidJob, responses
from .intake import ENVELOPE_BODY, module_paths, read_envelope

router = APIRouter(prefix="/v1/models", tags=["edits"])
MAX_EDITS_PER_MODEL = 32  # per user


def _model(name: str, key: KeyDep, catalog: CatalogDep) -> ModelSpec:
    spec = catalog.get(name)
    if spec is None:
        raise ApiError(404, f"unknown model {name[:100]!r}; GET /v1/models lists the hosted ones")
    if not key.allows(spec.name):
        raise ApiError(403, f"this API key may not use model {spec.name!r}")
    return spec


@router.post(
    "/{name}/edits",
    status_code=201,
    openapi_extra=ENVELOPE_BODY,
    responses=responses(401, 403, 404, 409, 413, 422, 429, 503),
)
async def add_edit(
    name: str, request: Request, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> EditRecord:
    """Register an edit for your own jobs on this model; jobs apply it by naming its id."""
    spec = _model(name, key, catalog)
    wait = await store.count_submit(key)
    if wait:
        raise ApiError(429, f"rate limit of {key.rate_limit} requests a minute reached", headers={"Retry-After": str(wait)})
    header, blob, body = await read_envelope(request, settings)
    if header.get("model", spec.name) != spec.name:
        raise ApiError(422, f"the envelope names model {str(header.get('model'))[:100]!r}, not {spec.name!r}")
    if "edits" in header:
        raise ApiError(422, "an edit cannot name other edits")
    state = await store.model(spec.name, "state", "structure")
    if "structure" not in state:
        raise ApiError(503, f"model {spec.name!r} is not loaded yet", headers={"Retry-After": "5"})
    limits = limits_for(spec, settings)
    try:
        graphs = await run_in_threadpool(validate_request, header, blob, limits, module_paths(state["structure"]))
        if len(graphs) != 1:
            raise GraphError(f"an edit is one graph, not a session of {len(graphs)}")
        check_edit(graphs[0])
    except GraphError as exc:
        raise InvalidJob(exc) from None
    lines = sorted({f"{n.line.file}:{n.line.line}: {n.line.code}"[:300] for n in graphs[0].nodes if n.line})
    record: EditRecord = {
        "id": "edit_" + secrets.token_hex(8),
        "model": spec.name,
        "nodes": len(graphs[0].nodes),
        "bytes": len(body),
        "created": time.time(),
        "lines": lines[:50],
    }
    if not await store.add_edit(key.user, spec.name, record, body, MAX_EDITS_PER_MODEL):
        raise ApiError(409, f"you have {MAX_EDITS_PER_MODEL} edits on {spec.name!r}, the most kept; remove one first")
    return record


@router.get("/{name}/edits", responses=responses(401, 403, 404, 429))
async def list_edits(name: str, key: KeyDep, store: StoreDep, catalog: CatalogDep) -> list[EditRecord]:
    """Your edits on this model, oldest first."""
    spec = _model(name, key, catalog)
    return await store.edits(key.user, spec.name)


@router.delete("/{name}/edits/{edit_id}", status_code=204, responses=responses(401, 403, 404, 429))
async def remove_edit(name: str, edit_id: str, key: KeyDep, store: StoreDep, catalog: CatalogDep) -> Response:
    """Remove one of your edits; jobs already queued keep the copy they were given."""
    spec = _model(name, key, catalog)
    if not await store.remove_edit(key.user, spec.name, edit_id[:100]):
        raise ApiError(404, f"you have no edit {edit_id[:40]!r} on {spec.name!r}")
    return Response(status_code=204)
