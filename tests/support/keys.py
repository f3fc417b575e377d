"""API keys and failed-authentication counters in a test's Redis, from synchronous tests.

    raw = new_key(redis_url, "gina", max_active=2)      # a key of its own, with these caps
    forget_failed_authentications(redis_url)            # every address may guess again
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.store import Store


def new_key(redis_url: str, user: str, models: list[str] | None = None, **caps: Any) -> str:
    async def create() -> str:
        store = Store.from_url(redis_url)
        try:
            raw, _ = await store.create_key(user, models or ["*"], **caps)
            return raw
        finally:
            await store.close()

    return asyncio.run(create())


def forget_failed_authentications(redis_url: str) -> None:
    async def forget() -> None:
        store = Store.from_url(redis_url)
        try:
            for key in await store.redis.keys("nnf:authfail:*"):
                await store.redis.delete(key)
        finally:
            await store.close()

    asyncio.run(forget())
