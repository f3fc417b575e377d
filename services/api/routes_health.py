"""/healthz (the process answers), /readyz (Redis answers and a scheduler holds Ray), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from ..common.catalog import Catalog
from ..common.store import Store
from .deps import get_catalog, get_store
from .metrics import Metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"ok": True}


@router.get("/readyz")
async def readyz(store: Store = Depends(get_store), catalog: Catalog = Depends(get_catalog)) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        checks["redis"] = bool(await store.redis.ping())
    except Exception as exc:
        checks["redis"] = f"unreachable: {exc}"
        return JSONResponse({"ready": False, "checks": checks}, status_code=503)
    # Schedulers hold the connection to Ray; a fresh heartbeat means dispatch can happen.
    schedulers = await store.alive("scheduler:")
    checks["ray"] = bool(schedulers) or "no scheduler connected to Ray"
    checks["models"] = {
        spec.name: (await store.model(spec.name, "state")).get("state", "not started") for spec in catalog.models
    }
    ready = checks["redis"] is True and checks["ray"] is True
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(
    request: Request, store: Store = Depends(get_store), catalog: Catalog = Depends(get_catalog)
) -> Response:
    collector: Metrics = request.app.state.metrics
    await collector.refresh(store, catalog)
    return Response(collector.render(), media_type=collector.content_type)
