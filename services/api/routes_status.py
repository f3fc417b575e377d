"""The operators' status page at `/` (static HTML that polls `/status.json`; no build step).

`/status.json` is public like `/readyz`: model states, queue depths and job outcomes, with no
user names, keys or job contents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from ..common.catalog import Catalog
from ..common.store import Store
from .deps import get_catalog, get_store
from .routes_models import describe

router = APIRouter(tags=["status"])
_PAGE = Path(__file__).with_name("static") / "status.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE.read_text())


@router.get("/status.json")
async def status(store: Store = Depends(get_store), catalog: Catalog = Depends(get_catalog)) -> dict[str, Any]:
    models = [await describe(spec, store) for spec in catalog.models]
    jobs = []
    for job in await store.recent_jobs(20):
        started, finished = job.get("started"), job.get("finished")
        jobs.append({
            "id": job["id"],
            "model": job["model"],
            "state": job["state"],
            "kind": job.get("meta", {}).get("kind"),
            "waited_s": None if started is None else started - job["created"],
            "ran_s": None if started is None or finished is None else finished - started,
        })  # fmt: skip
    shown = ("name", "state", "replicas", "replicas_wanted", "queue_depth", "oldest_wait_s", "gpus")
    return {
        "models": [{k: m[k] for k in shown} for m in models],
        "jobs": jobs,
        "outcomes": await store.outcomes(),
    }
