"""The Grafana dashboard the chart ships queries only metrics the api really exports: every
nnfabric_* name in every panel's PromQL (and the model variable's query) is a sample name of
the real app's /metrics, after real traffic on a real Redis."""

from __future__ import annotations

import asyncio
import json
import re

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api.app import create_app
from services.common.settings import Settings
from services.common.store import Store
from services.scheduler.history import HistorySampler
from tests.support.history import jobs_with_times
from tests.unit.test_helm import find, render

METRIC = re.compile(r"\bnnfabric_[a-zA-Z0-9_:]+")


def shipped_dashboard() -> dict:  # type: ignore[type-arg]
    (configmap,) = find(render({"secrets": {"password": "pw"}}), "ConfigMap", "-dashboard")
    (text,) = configmap["data"].values()
    dashboard: dict = json.loads(text)  # type: ignore[type-arg]
    return dashboard


def queries(dashboard: dict) -> list[str]:  # type: ignore[type-arg]
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"])
    return found


def exported(redis_url: str, catalog_path: str) -> set[str]:
    """Sample names of the real app's /metrics once a model has served jobs and been sampled."""
    settings = Settings(redis_url=redis_url, catalog=catalog_path)

    async def traffic() -> None:
        store = Store.from_url(redis_url)
        await store.redis.flushdb()
        sampler = HistorySampler(store, ["m"], settings, "s")
        await sampler.sample("m")
        await jobs_with_times(store, "m", [(0.2, 0.1), (0.4, 0.3)], batch=2)
        await store.replica_alive("m", "r1", ttl_s=60)
        await sampler.sample("m")
        await store.close()

    asyncio.run(traffic())
    with TestClient(create_app(settings)) as api:
        assert api.get("/status.json").status_code == 200  # some requests to count and time
        text = api.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_a_panel_queries_is_exported(redis_url, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "x"}]}))
    dashboard = shipped_dashboard()
    names = exported(redis_url, str(catalog))

    exprs = queries(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        used = METRIC.findall(expr)
        assert used, f"no nnfabric metric in {expr!r}"
        missing = [name for name in used if name not in names]
        assert not missing, f"{expr!r} queries {missing}, not exported by /metrics"
    # The dashboard charts what the status page charts, per model.
    queried = {name for expr in exprs for name in METRIC.findall(expr)}
    assert {"nnfabric_queue_depth", "nnfabric_model_jobs_finished_total", "nnfabric_model_wait_seconds",
            "nnfabric_model_run_seconds", "nnfabric_model_batches_total", "nnfabric_model_replicas_ready",
            "nnfabric_http_request_seconds_bucket"} <= queried  # fmt: skip


def test_the_dashboard_is_well_formed_for_grafana():
    dashboard = shipped_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
