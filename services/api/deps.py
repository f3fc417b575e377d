"""Request dependencies, as types: `store: StoreDep`, `key: KeyDep` (API-key authentication)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, WebSocket

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import ApiKey, Store


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_catalog(request: Request) -> Catalog:
    catalog: Catalog = request.app.state.catalog
    return catalog


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _bearer(header: str | None) -> str:
    if not header or not header.lower().startswith("bearer "):
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'")
    return header[7:].strip()


async def require_key(request: Request, store: Annotated[Store, Depends(get_store)]) -> ApiKey:
    key, retry = await store.authorize(_bearer(request.headers.get("authorization")))
    if key is None:
        raise HTTPException(401, "unknown API key")
    if retry:
        raise HTTPException(
            429, f"rate limit of {key.rate_limit} requests a minute reached", headers={"Retry-After": str(retry)}
        )
    return key


StoreDep = Annotated[Store, Depends(get_store)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeyDep = Annotated[ApiKey, Depends(require_key)]


async def websocket_key(websocket: WebSocket) -> ApiKey | None:
    store: Store = websocket.app.state.store
    header = websocket.headers.get("authorization")
    token = websocket.query_params.get("key")
    try:
        raw = _bearer(header) if header else (token or "")
    except HTTPException:
        return None
    return await store.lookup_key(raw) if raw else None
