"""/healthz (the process answers), /readyz (the fabric can run jobs now), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from nnfabric.protocol import Health, Readiness

from .deps import CatalogDep, StoreDep
from .metrics import Metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The api process answers."""
    return {"ok": True}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(store: StoreDep, catalog: CatalogDep) -> JSONResponse:
    """Ready when the fabric can run jobs now: Redis answers, a scheduler (which holds the
    connection to Ray) is alive, and at least one model has a live replica. The checks say
    which part is missing, and each model's state."""
    checks: dict[str, Any] = {}
    try:
        checks["redis"] = await store.ping()
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
        return JSONResponse({"ready": False, "checks": checks}, status_code=503)
    schedulers = await store.alive("scheduler:")
    checks["ray"] = bool(schedulers) or "no scheduler connected to Ray"
    models = {}
    for spec in catalog.models:
        state = (await store.model(spec.name, "state")).get("state", "not started")
        if state == "ready" and not await store.live_replicas(spec.name):
            state = "unavailable"
        models[spec.name] = state
    checks["models"] = models
    runnable = any(state == "ready" for state in models.values())
    ready = checks["redis"] is True and checks["ray"] is True and runnable
    if not runnable:
        checks["jobs"] = "no model has a live replica; jobs wait in their queues"
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, store: StoreDep, catalog: CatalogDep) -> Response:
    """Prometheus metrics."""
    collector: Metrics = request.app.state.metrics
    await collector.refresh(store, catalog)
    return Response(collector.render(), media_type=collector.content_type)
