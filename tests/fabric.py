"""A whole fabric on 127.0.0.1 for the integration tests: real Redis, Ray Serve, scheduler, uvicorn."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.redis_server import RedisServer, free_port
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fabric:
    url: str
    settings: Settings
    redis: RedisServer
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    scheduler: subprocess.Popen[bytes] | None = None

    def start_scheduler(self, name: str = "scheduler-0") -> None:
        env = {**self.env, "NNFABRIC_SCHEDULER_NAME": name}
        self.scheduler = subprocess.Popen([sys.executable, "-m", "services.scheduler"], cwd=ROOT, env=env)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.kill()  # SIGKILL: no chance to acknowledge anything
        self.scheduler.wait(10)
        self.scheduler = None

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)


def write_catalog(path: Path, model_dir: Path) -> None:
    catalog = {
        "models": [
            {"name": "tiny-gpt2", "source": str(model_dir), "replicas": 1,
             "limits": {"max_batch": 4, "timeout_s": 60, "max_saved_bytes": 4_000_000, "max_new_tokens": 16}},
            {"name": "not-deployed", "source": "/nonexistent", "replicas": 1},
        ]
    }  # fmt: skip
    path.write_text(yaml.safe_dump(catalog))


def start_fabric(tmp: Path, model_dir: Path) -> Fabric:
    import ray
    import uvicorn

    from services.api.app import create_app
    from services.common.catalog import Catalog
    from services.worker.deployment import deploy_catalog

    redis = RedisServer.start()
    catalog_path = tmp / "catalog.yaml"
    write_catalog(catalog_path, model_dir)
    ray.init(num_cpus=2, include_dashboard=False, namespace="nnfabric", log_to_driver=False)
    env = {
        **os.environ,
        "NNFABRIC_REDIS_URL": redis.url,
        "NNFABRIC_CATALOG": str(catalog_path),
        "NNFABRIC_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "NNFABRIC_RECLAIM_IDLE_MS": "1500",
        "NNFABRIC_MAX_ENVELOPE_BYTES": str(2_000_000),
    }
    settings = Settings(redis_url=redis.url, catalog=str(catalog_path), max_envelope_bytes=2_000_000)
    catalog = Catalog.load(catalog_path)
    deployable = Catalog(models=[m for m in catalog.models if m.name != "not-deployed"])
    deploy_catalog(deployable, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    fabric = Fabric(f"http://127.0.0.1:{port}", settings, redis, env)
    fabric._server = server  # type: ignore[attr-defined]
    fabric._thread = thread  # type: ignore[attr-defined]
    fabric.start_scheduler()
    fabric.keys = fabric.run(_make_keys(redis.url))
    wait_ready(fabric)
    return fabric


async def _make_keys(url: str) -> dict[str, str]:
    from redis.asyncio import Redis

    from services.common.store import Store

    store = Store(Redis.from_url(url))
    keys = {}
    keys["alice"], _ = await store.create_key("alice", ["*"], rate_limit=10_000)
    keys["bob"], _ = await store.create_key("bob", ["tiny-gpt2"], rate_limit=10_000)
    keys["scoped"], _ = await store.create_key("carol", ["other-model"], rate_limit=10_000)
    keys["slow"], _ = await store.create_key("dave", ["*"], rate_limit=3)
    await store.redis.aclose()
    return keys


def wait_ready(fabric: Fabric, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(f"{fabric.url}/readyz")
        if response.status_code == 200 and response.json()["checks"]["models"]["tiny-gpt2"] == "ready":
            return
        time.sleep(0.2)
    raise RuntimeError(f"fabric not ready: {httpx.get(f'{fabric.url}/readyz').text}")


def stop_fabric(fabric: Fabric) -> None:
    import ray
    from ray import serve

    if fabric.scheduler is not None:
        fabric.scheduler.terminate()
        fabric.scheduler.wait(10)
    fabric._server.should_exit = True  # type: ignore[attr-defined]
    fabric._thread.join(10)  # type: ignore[attr-defined]
    serve.shutdown()
    ray.shutdown()
    fabric.redis.stop()
