"""/v1/models: the catalog with live state, each model's module tree and tokenizer."""

from __future__ import annotations

import json
import time
from typing import Any, cast

from fastapi import APIRouter
from nnfabric.protocol import ModelInfo, ModelLimitsInfo, ModelStructure, ModuleTreeJSON, TokenizerFiles

from ..common.catalog import Catalog, ModelSpec
from ..common.store import Store
from .deps import CatalogDep, KeyDep, StoreDep
from .errors import ApiError, responses

router = APIRouter(prefix="/v1/models", tags=["models"])


async def describe(spec: ModelSpec, store: Store) -> ModelInfo:
    """A catalog model as it is now: a model counts as ready only while a replica says so."""
    # Liveness first: a replica that gives up writes why ("lost") before it stops counting as live.
    alive = await store.live_replicas(spec.name)
    live = await store.model(spec.name, "state", "error", "last_alive", "lost")
    depth, wait = await store.queue_depth(spec.name)
    state = live.get("state", "not started")
    if state == "ready" and alive == 0:
        # It loaded once, but no replica answers now (its process or node is gone, or Serve is
        # replacing it): say so, and what happens to jobs meanwhile.
        state = "unavailable"
        silent = time.time() - float(live.get("last_alive") or time.time())
        live["error"] = (
            f"no replica has answered for {silent:.0f} s; jobs wait in the queue (up to the queue "
            "deadline) and run when a replica is back"
        )
        when, _, why = live.get("lost", "").partition(" ")
        if why and time.time() - float(when) < 600:
            live["error"] += f" (the last replica reported: {why})"
    elif state == "ready":
        live.pop("error", None)
    return {
        "name": spec.name,
        "source": spec.source,
        "dtype": spec.dtype,
        "gpus": spec.gpus,
        "state": state,
        "error": live.get("error") or None,
        "replicas": alive,
        "replicas_wanted": spec.replicas,
        "queue_depth": depth,
        "oldest_wait_s": wait,
        "limits": cast(ModelLimitsInfo, spec.limits.model_dump()),
    }


def _spec(name: str, catalog: Catalog) -> ModelSpec:
    spec = catalog.get(name)
    if spec is None:
        raise ApiError(404, f"unknown model {name[:100]!r}")
    return spec


@router.get("", responses=responses(401, 429))
async def list_models(key: KeyDep, store: StoreDep, catalog: CatalogDep) -> list[ModelInfo]:
    """Every catalog model with its live state, replicas and queue."""
    return [await describe(spec, store) for spec in catalog.models]


@router.get("/{name}", responses=responses(401, 404, 429))
async def one_model(name: str, key: KeyDep, store: StoreDep, catalog: CatalogDep) -> ModelInfo:
    return await describe(_spec(name, catalog), store)


async def _published(name: str, field: str, store: Store, catalog: Catalog) -> Any:
    spec = _spec(name, catalog)
    live = await store.model(spec.name, "state", field)
    if field not in live:
        raise ApiError(
            503,
            f"model {spec.name!r} is not loaded yet ({live.get('state', 'not started')})",
            headers={"Retry-After": "5"},
        )
    return json.loads(live[field])


@router.get("/{name}/structure", responses=responses(401, 404, 429, 503))
async def structure(name: str, key: KeyDep, store: StoreDep, catalog: CatalogDep) -> ModelStructure:
    """The model's module tree (names and types): what a thin client traces against."""
    tree: ModuleTreeJSON = await _published(name, "structure", store, catalog)
    return {"name": _spec(name, catalog).name, "tree": tree}


@router.get("/{name}/tokenizer", responses=responses(401, 404, 429, 503))
async def tokenizer(name: str, key: KeyDep, store: StoreDep, catalog: CatalogDep) -> TokenizerFiles:
    """The model's tokenizer files, so a thin client tokenizes exactly as the replica does."""
    files: dict[str, str] = await _published(name, "tokenizer", store, catalog)
    return {"files": files}
