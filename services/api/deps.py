"""Request dependencies, as types: `store: StoreDep`, `key: KeyDep` (API-key authentication)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, WebSocket

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .proxies import TrustedProxies


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


def client_address(connection: Request | WebSocket) -> str:
    """The address failed authentications count against: the peer, or behind a trusted proxy
    the client it forwards for (NNFABRIC_TRUSTED_PROXIES)."""
    peer = connection.client.host if connection.client else "unknown"
    proxies: TrustedProxies = connection.app.state.proxies
    return proxies.client(peer, connection.headers.getlist("x-forwarded-for"))


async def require_key(request: Request, store: Annotated[Store, Depends(get_store)]) -> ApiKey:
    key, wait = await store.authorize(_bearer(request.headers.get("authorization")), client_address(request))
    if wait:
        raise HTTPException(
            429, "too many failed authentications from this address; try later", headers={"Retry-After": str(wait)}
        )
    if key is None:
        raise HTTPException(401, "unknown API key")
    return key


StoreDep = Annotated[Store, Depends(get_store)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
KeyDep = Annotated[ApiKey, Depends(require_key)]

