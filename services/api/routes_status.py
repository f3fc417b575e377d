"""The operators' status page at `/` (static HTML that polls `/status.json` and
`/status/history.json` and draws its own SVG charts; no build step, no CDN: clusters are often
offline).

Both routes are public like `/readyz`, so they show aggregates only: model states, queue
depths, job outcomes, recent waits, and about an hour of each model's history (sampled by the
schedulers: services/scheduler/history.py). No job ids, user names, keys or job contents.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any, cast

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from nnfabric.protocol import ModelHistory, StatusHistory, StatusModel, StatusPage

from .deps import CatalogDep, SettingsDep, StoreDep
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


_COLUMNS = ("t", "queue_depth", "jobs_per_s", "wait_p50_s", "wait_p95_s", "run_p50_s", "run_p95_s", "batch_size",
            "replicas")  # fmt: skip


@router.get("/status/history.json")
async def history(store: StoreDep, catalog: CatalogDep, settings: SettingsDep) -> StatusHistory:
    """About an hour of each model's queue depth, jobs per second, p50/p95 wait and run, batch
    size and live replicas: one sample every `interval_s`, oldest first, as columns."""
    names = [spec.name for spec in catalog.models]
    samples = await store.history(names)
    models: list[ModelHistory] = []
    for name in names:
        columns: dict[str, Any] = {column: [s.get(column) for s in samples[name]] for column in _COLUMNS}
        models.append(cast(ModelHistory, {"name": name, **columns}))
    return {"interval_s": settings.history_interval_s, "window_s": settings.history_s, "now": await store.now(),
            "models": models}  # fmt: skip
