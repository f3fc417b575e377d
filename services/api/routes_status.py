"""The operators' status page at `/` (static HTML that polls `/status.json`; no build step).

`/status.json` is public like `/readyz`, so it shows aggregates only: model states, queue
depths, job outcomes and recent waits. No job ids, user names, keys or job contents.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from nnfabric.protocol import StatusModel, StatusPage

from .deps import CatalogDep, StoreDep
from .routes_models import describe

router = APIRouter(tags=["status"])
_PAGE = Path(__file__).with_name("static") / "status.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE.read_text())


@router.get("/status.json")
async def status(store: StoreDep, catalog: CatalogDep) -> StatusPage:
    """Model states and queues, and aggregates over the most recent jobs."""
    models: list[StatusModel] = []
    for spec in catalog.models:
        info = await describe(spec, store)
        models.append({
            "name": info["name"], "state": info["state"], "replicas": info["replicas"],
            "replicas_wanted": info["replicas_wanted"], "queue_depth": info["queue_depth"],
            "oldest_wait_s": info["oldest_wait_s"], "gpus": info["gpus"], "reason": info["error"],
        })  # fmt: skip
    recent = await store.recent_jobs(100)
    waits = [j["started"] - j["created"] for j in recent if "started" in j]
    runs = [j["finished"] - j["started"] for j in recent if "started" in j and "finished" in j]
    return {
        "models": models,
        "jobs": {
            "recent": len(recent),
            "by_state": dict(Counter(j["state"] for j in recent)),
            "median_wait_s": statistics.median(waits) if waits else None,
            "median_run_s": statistics.median(runs) if runs else None,
        },
        "outcomes": await store.outcomes(),
    }
