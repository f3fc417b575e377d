"""A live api in its own process (so its memory can be read) on a real Redis, with a tiny model
published as ready the way a replica publishes it, and the real executor beside it. No Ray."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from services.common.catalog import Catalog
from services.common.redis_server import RedisServer, free_port
from services.common.settings import Settings
from services.common.store import Store
from services.worker.executor import BatchExecutor

ROOT = Path(__file__).resolve().parents[2]
ENVELOPE_LIMIT = 4 << 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Gateway:
    def __init__(self, url: str, process: subprocess.Popen[bytes], key: str, executor: BatchExecutor,
                 redis: RedisServer) -> None:  # fmt: skip
        self.url = url
        self.key = key
        self.process = process
        self.redis = redis
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.executor = executor

    def submit(self, body: bytes) -> httpx.Response:
        return self.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.redis.stop()


def start_gateway(folder: Path, model) -> Gateway:  # type: ignore[no-untyped-def]
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [
        {"name": "tiny", "source": "x", "limits": {"max_nodes": 2000, "max_tensor_bytes": 1 << 20,
                                                   "max_new_tokens": 8}},
    ]}))  # fmt: skip
    redis = RedisServer.start()
    settings = Settings(redis_url=redis.url, catalog=str(catalog), max_envelope_bytes=ENVELOPE_LIMIT)

    async def publish() -> str:
        store = Store.from_url(redis.url)
        await store.set_model("tiny", state="ready", structure=json.dumps(model.tree.to_json()))
        await store.replica_alive("tiny", "r1", ttl_s=3600)
        await store.heartbeat("scheduler:s1", ttl_s=3600)  # as if a scheduler held Ray
        key, _ = await store.create_key("mallory", ["*"], max_active=1_000_000)
        await store.close()
        return key

    key = asyncio.run(publish())
    port = free_port()
    env = {**os.environ, "NNFABRIC_REDIS_URL": redis.url, "NNFABRIC_CATALOG": str(catalog),
           "NNFABRIC_MAX_ENVELOPE_BYTES": str(ENVELOPE_LIMIT), "NNFABRIC_COMPILED_WAIT_S": "1",
           # The checkout's services, and the client the tests import (a worktree's, not the venv's install).
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error"],
        env=env, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    spec = Catalog.load(catalog).models[0]
    executor = BatchExecutor(spec, model._module, model.tokenizer, settings)
    return Gateway(url, process, key, executor, redis)
