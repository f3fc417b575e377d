"""Opening one of the api's websockets: who it is, a slot among the key's event streams, and
refusals a client can read.

    opened = await StreamSocket.open(websocket)        # None: refused (4401), already closed
    if opened and await opened.take_slot():            # False: refused (4429), already closed
        await opened.accept()
        ...
        await opened.close()                           # the slot is given back before the close
    # and in a `finally`: await opened.release()       # idempotent

The key comes from `Authorization: Bearer <key>`; from `Sec-WebSocket-Protocol: bearer, <key>`
for browsers, which cannot set headers on a websocket (the server then accepts the `bearer`
subprotocol, as browsers require); or from `?key=`, which proxies and servers write to their
access logs (kept for old clients; the docs say so). Refusals accept the connection and then
close it with the code and reason: uvicorn answers a close before the accept with a bare HTTP
403, which tells a client nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from fastapi import WebSocket, WebSocketDisconnect

from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .deps import client_address

BEARER = "bearer"


def _offered_key(websocket: WebSocket) -> tuple[str, str | None]:
    """(the raw key offered, the subprotocol to accept)."""
    offered = [p.strip() for p in websocket.scope.get("subprotocols") or []]
    header = websocket.headers.get("authorization") or ""
    if header.lower().startswith("bearer "):
        return header[7:].strip(), BEARER if offered[:1] == [BEARER] else None
    if len(offered) >= 2 and offered[0].lower() == BEARER:
        return offered[1], BEARER
    return websocket.query_params.get("key") or "", None


async def refuse(websocket: WebSocket, code: int, reason: str, subprotocol: str | None = None) -> None:
    await websocket.accept(subprotocol=subprotocol)
    await websocket.close(code=code, reason=reason)


@dataclass
class StreamSocket:
    websocket: WebSocket
    key: ApiKey
    subprotocol: str | None
    holding: bool = False

    @property
    def store(self) -> Store:
        store: Store = self.websocket.app.state.store
        return store

    @classmethod
    async def open(cls, websocket: WebSocket) -> StreamSocket | None:
        """The websocket's key, or None once it has been refused (unknown key, or an address
        throttled for failed attempts; failures count as on HTTP)."""
        raw, subprotocol = _offered_key(websocket)
        store: Store = websocket.app.state.store
        key, wait = await store.authorize(raw, client_address(websocket))
        if key is None:
            reason = "too many failed authentications from this address; try later" if wait else "unknown or missing API key"
            await refuse(websocket, 4429 if wait else 4401, reason, subprotocol)
            return None
        return cls(websocket, key, subprotocol)

    async def take_slot(self) -> bool:
        """Count this websocket among the key's event streams (waiting a moment for one just
        closed to be given back); refused with 4429 when they stay in use."""
        settings: Settings = self.websocket.app.state.settings
        if await self.store.open_stream(self.key, settings.stream_slot_wait_s):
            self.holding = True
            return True
        await self.refuse(4429, f"this key already has {self.key.max_streams} event streams open")
        return False

    async def accept(self) -> None:
        await self.websocket.accept(subprotocol=self.subprotocol)

    async def refuse(self, code: int, reason: str) -> None:
        await refuse(self.websocket, code, reason, self.subprotocol)

    async def release(self) -> None:
        """Give the stream slot back, once; completes even if the handler is being cancelled."""
        if self.holding:
            self.holding = False
            await asyncio.shield(self.store.close_stream(self.key))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """The server ends the stream: the slot is free before the client hears the close, so
        a client that opens its next stream at once always finds it."""
        await self.release()
        await self.websocket.close(code=code, reason=reason)


async def until_disconnected(websocket: WebSocket) -> None:
    """Until the client closes (a stream it only listens on: anything it sends is ignored)."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
