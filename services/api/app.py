"""The gateway: `create_app(settings)` builds the FastAPI app (run it with uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import Store
from . import routes_health, routes_jobs, routes_models, routes_status
from .errors import ApiError, api_error_handler
from .metrics import Metrics


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url)
        app.state.store = Store(redis, settings.result_ttl_s)
        yield
        await redis.aclose()

    app = FastAPI(title="nnfabric", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.catalog = Catalog.load(settings.catalog)
    app.state.metrics = Metrics()
    app.middleware("http")(app.state.metrics.middleware)
    app.add_exception_handler(ApiError, api_error_handler)
    for module in (routes_jobs, routes_models, routes_health, routes_status):
        app.include_router(module.router)
    return app
