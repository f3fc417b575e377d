"""Helpers for the integration tests: a catalog around the tiny model, and API keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from services.launcher import EmbeddedFabric


def write_catalog(path: Path, model_dir: Path) -> None:
    catalog = {
        "models": [
            {"name": "tiny-gpt2", "source": str(model_dir), "replicas": 1, "cpus": 0.5,
             "limits": {"max_batch": 4, "timeout_s": 60, "max_saved_bytes": 4_000_000, "max_new_tokens": 16}},
            {"name": "tiny-strict", "source": str(model_dir), "replicas": 1, "cpus": 0.5,
             "limits": {"max_batch": 1, "timeout_s": 0.5}},
            # Follows its queue: one replica when idle, two under a backlog.
            {"name": "tiny-auto", "source": str(model_dir), "cpus": 0.5, "min_replicas": 1, "max_replicas": 2,
             "scale_up_s": 0.5, "scale_down_s": 2, "limits": {"max_batch": 1, "timeout_s": 60}},
            {"name": "not-deployed", "source": "/nonexistent", "replicas": 1},
        ]
    }  # fmt: skip
    path.write_text(yaml.safe_dump(catalog))


def start_fabric(tmp: Path, model_dir: Path) -> EmbeddedFabric:
    catalog_path = tmp / "catalog.yaml"
    write_catalog(catalog_path, model_dir)
    fabric = EmbeddedFabric.start(
        catalog_path,
        deploy=["tiny-gpt2", "tiny-strict", "tiny-auto"],
        reclaim_idle_ms=1500,
        watchdog_margin_s=1.0,
        max_envelope_bytes=2_000_000,
        redis_data_dir=str(tmp / "redis"),
        result_store_dir=str(tmp / "results"),
        result_store_min_bytes=1 << 20,  # results from 1 MiB up go to disk, so the tests see both paths
        history_interval_s=1.0,  # the status page's history: a sample a second, so its test waits seconds
    )
    try:
        fabric.keys = asyncio.run(_make_keys(fabric.settings.redis_url))  # type: ignore[attr-defined]
        fabric.wait_ready()
    except BaseException:
        fabric.stop()
        raise
    return fabric


async def _make_keys(url: str) -> dict[str, str]:
    from redis.asyncio import Redis

    from services.common.store import Store

    store = Store(Redis.from_url(url))
    keys = {}
    keys["alice"], _ = await store.create_key("alice", ["*"])
    keys["bob"], _ = await store.create_key("bob", ["tiny-gpt2"])
    keys["scoped"], _ = await store.create_key("carol", ["other-model"])
    keys["slow"], _ = await store.create_key("dave", ["*"], rate_limit=3)
    await store.redis.aclose()
    return keys


def stop_fabric(fabric: EmbeddedFabric) -> None:
    fabric.stop()
