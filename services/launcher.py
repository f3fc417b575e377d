"""One machine, every service: Redis (unless given), Ray, the model replicas, a scheduler, the api.

    fabric = EmbeddedFabric.start("catalog.yaml")     # what `nnfabric-server serve` runs
    fabric.url                                        # http://127.0.0.1:<port>
    fabric.stop()

The scheduler runs as its own process (as in a cluster), so it can die and restart alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common.catalog import Catalog
from .common.redis_server import RedisServer, free_port
from .common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

# Ray's defaults assume a machine of its own. Here the replicas share the CPUs with the api,
# Redis and the scheduler: Ray starts its workers at niceness 15, so under load a replica waited
# behind everything else (150-200 ms per job around a 5 ms forward pass), and an idle fabric spent
# over a core of two on housekeeping (Serve's control loop and metrics export at 10 Hz,
# per-process metrics nobody reads here). Set before Ray starts so its processes inherit them;
# an operator's own values win.
RAY_ON_ONE_MACHINE = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000",
    "RAY_enable_metrics_collection": "0",
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
    # Serve's handle runs its router on an event loop of its own, so each call from the scheduler
    # hops threads twice, each a wakeup on a busy CPU; the scheduler is async, so its own loop does.
    # (The replica's matching switch, RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, changed the
    # replica's float results, so remote would no longer equal local bit for bit: left on.)
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def _convert_here(catalog: Catalog, settings: Settings) -> Catalog:
    """Convert GGUF sources in this process, where whoever started it sees the progress; the
    replicas then load the converted directories."""
    if not any(spec.source.endswith(".gguf") for spec in catalog.models):
        return catalog
    from .worker.loader import prepare

    models = []
    for spec in catalog.models:
        if spec.source.endswith(".gguf"):
            print(f"preparing {spec.name} from {spec.source} (converted once, then cached)", file=sys.stderr)
            spec = spec.model_copy(update={"source": prepare(spec, settings.cache_dir)})
        models.append(spec)
    return Catalog(models=models)


@dataclass
class EmbeddedFabric:
    url: str
    settings: Settings
    env: dict[str, str]
    redis: RedisServer | None = None
    scheduler: subprocess.Popen[bytes] | None = None
    _server: Any = None
    _thread: threading.Thread | None = None
    deployed: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        catalog_path: str | Path,
        redis_url: str | None = None,
        port: int = 0,
        deploy: list[str] | None = None,
        **overrides: Any,
    ) -> EmbeddedFabric:
        import ray

        redis = None if redis_url else RedisServer.start(data_dir=Settings(**overrides).redis_data_dir)
        try:
            return cls._start(catalog_path, redis, redis_url or (redis.url if redis else ""), port, deploy, overrides)
        except BaseException:
            # Nothing half-started outlives a failed start: Ray and our Redis go by process id.
            if ray.is_initialized():
                ray.shutdown()
            if redis is not None:
                redis.stop()
            raise

    @classmethod
    def _start(
        cls,
        catalog_path: str | Path,
        redis: RedisServer | None,
        redis_url: str,
        port: int,
        deploy: list[str] | None,
        overrides: dict[str, Any],
    ) -> EmbeddedFabric:
        import ray

        from .worker.deployment import deploy_catalog

        catalog = Catalog.load(catalog_path)
        settings = Settings(redis_url=redis_url, catalog=str(catalog_path), **overrides)
        if not ray.is_initialized():
            # Ray's processes and the scheduler inherit these. Serve read its own settings in this
            # process at import, so a handle used here keeps Serve's defaults (no event loop of
            # ours need outlive it).
            for name, value in RAY_ON_ONE_MACHINE.items():
                os.environ.setdefault(name, value)
            ray.init(include_dashboard=False, namespace=settings.ray_namespace, log_to_driver=False)
        env = {
            **os.environ,
            "NNFABRIC_REDIS_URL": redis_url,
            "NNFABRIC_CATALOG": str(catalog_path),
            "NNFABRIC_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            **{f"NNFABRIC_{k.upper()}": str(v) for k, v in overrides.items()},
        }
        chosen = Catalog(models=[m for m in catalog.models if deploy is None or m.name in deploy])
        deploy_catalog(_convert_here(chosen, settings), settings)
        port = port or free_port()
        server, thread = _serve_api(settings, port)
        fabric = cls(
            f"http://{settings.api_host}:{port}",
            settings,
            env,
            redis,
            None,
            server,
            thread,
            [m.name for m in chosen.models],
        )
        fabric.start_scheduler()
        return fabric

    def restart_api(self) -> None:
        """Stop the api and start a fresh one on the same port (what a rolling restart does)."""
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)
        port = int(self.url.rsplit(":", 1)[1])
        self._server, self._thread = _serve_api(self.settings, port)

    def api_thread_id(self) -> int:
        """The native id of the thread the api runs in (its CPU time is per thread in /proc)."""
        assert self._thread is not None and self._thread.native_id is not None
        return self._thread.native_id

    def start_scheduler(self, name: str | None = None, **settings: Any) -> None:
        """Start the scheduler process (again); `settings` override the fabric's for it."""
        env = {**self.env, "NNFABRIC_SCHEDULER_NAME": name or self.settings.scheduler_name, "PYTHONPATH": str(ROOT),
               **{f"NNFABRIC_{k.upper()}": str(v) for k, v in settings.items()}}  # fmt: skip
        self.scheduler = subprocess.Popen([sys.executable, "-m", "services.scheduler"], cwd=ROOT, env=env)

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.kill()  # no chance to acknowledge anything
        self.scheduler.wait(10)
        self.scheduler = None

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/readyz")
            states = response.json()["checks"].get("models", {})
            if response.status_code == 200 and all(states.get(name) == "ready" for name in self.deployed):
                return
            time.sleep(0.2)
        raise RuntimeError(f"fabric not ready: {httpx.get(f'{self.url}/readyz').text}")

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.scheduler is not None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(10)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
                self.scheduler.wait(10)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        try:
            serve.shutdown()
        finally:  # whatever Serve says on the way out, Ray and our Redis go
            ray.shutdown()
            if self.redis is not None:
                self.redis.stop()


def _serve_api(settings: Settings, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    from .api.app import create_app

    # No per-message deflate: results are tensors, which barely compress, and it costs CPU per frame.
    # No proxy headers: the api decides whom to believe (NNFABRIC_TRUSTED_PROXIES), not uvicorn.
    # A job sent on the job socket may be as large as one POSTed (uvicorn's default is 16 MiB).
    config = uvicorn.Config(create_app(settings), host=settings.api_host, port=port, log_level="warning",
                            ws_per_message_deflate=False, proxy_headers=False,
                            ws_max_size=settings.max_envelope_bytes)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the api could not start on port {port}")
        time.sleep(0.05)
    return server, thread
