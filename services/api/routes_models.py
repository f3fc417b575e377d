"""/v1/models: the catalog with live state, each model's module tree and tokenizer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends

from ..common.catalog import Catalog, ModelSpec
from ..common.store import ApiKey, Store
from .deps import get_catalog, get_store, require_key
from .errors import ApiError

router = APIRouter(prefix="/v1/models", tags=["models"])


async def describe(spec: ModelSpec, store: Store) -> dict[str, Any]:
    live = await store.model(spec.name, "state", "error", "replicas")
    depth, wait = await store.queue_depth(spec.name)
    return {
        "name": spec.name,
        "source": spec.source,
        "dtype": spec.dtype,
        "gpus": spec.gpus,
        "state": live.get("state", "not started"),
        "error": live.get("error") or None,
        "replicas": int(live.get("replicas", 0)) if live.get("state") == "ready" else 0,
        "replicas_wanted": spec.replicas,
        "queue_depth": depth,
        "oldest_wait_s": wait,
        "limits": spec.limits.model_dump(),
    }


def _spec(name: str, catalog: Catalog) -> ModelSpec:
    spec = catalog.get(name)
    if spec is None:
        raise ApiError(404, f"unknown model {name!r}")
    return spec


@router.get("")
async def list_models(
    key: ApiKey = Depends(require_key), store: Store = Depends(get_store), catalog: Catalog = Depends(get_catalog)
) -> list[dict[str, Any]]:
    return [await describe(spec, store) for spec in catalog.models]


@router.get("/{name}")
async def one_model(
    name: str,
    key: ApiKey = Depends(require_key),
    store: Store = Depends(get_store),
    catalog: Catalog = Depends(get_catalog),
) -> dict[str, Any]:
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


@router.get("/{name}/structure")
async def structure(
    name: str,
    key: ApiKey = Depends(require_key),
    store: Store = Depends(get_store),
    catalog: Catalog = Depends(get_catalog),
) -> dict[str, Any]:
    tree: dict[str, Any] = await _published(name, "structure", store, catalog)
    return {"name": _spec(name, catalog).name, "tree": tree}


@router.get("/{name}/tokenizer")
async def tokenizer(
    name: str,
    key: ApiKey = Depends(require_key),
    store: Store = Depends(get_store),
    catalog: Catalog = Depends(get_catalog),
) -> dict[str, Any]:
    files: dict[str, str] = await _published(name, "tokenizer", store, catalog)
    return {"files": files}
