"""The gateway: `create_app(settings)` builds the FastAPI app (run it with uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nnfabric
from fastapi import FastAPI

from ..common.catalog import Catalog
from ..common.settings import Settings
from ..common.store import Store
from . import (
    errors,
    routes_batches,
    routes_compiled,
    routes_edits,
    routes_health,
    routes_jobs,
    routes_models,
    routes_schema,
    routes_socket,
    routes_status,
)
from .metrics import Metrics
from .proxies import TrustedProxies


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = Store.from_url(settings.redis_url, settings.result_ttl_s)
        yield
        await app.state.store.close()

    app = FastAPI(title="nnfabric", version=nnfabric.__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.catalog = Catalog.load(settings.catalog)
    app.state.proxies = TrustedProxies.parse(settings.trusted_proxies)
    app.state.metrics = Metrics()
    app.middleware("http")(app.state.metrics.middleware)
    errors.install(app)
    for module in (
        routes_jobs, routes_batches, routes_socket, routes_models, routes_edits, routes_compiled, routes_health,
        routes_status, routes_schema,
    ):  # fmt: skip
        app.include_router(module.router)
    routes_schema.install_openapi(app)
    return app
