"""The chart's topology on one machine, each piece its own process as Kubernetes would run it:
Redis with a password; a Ray head with no CPUs and a Ray worker node, both from `ray start`,
with Ray's token authentication; the Serve applications deployed from the chart's rendered
`serveConfigV2` through the dashboard's REST API (the path KubeRay uses); the scheduler as a Ray
Client of the head (as the chart connects it); the api on its own; a key made with the CLI.

Its own pytest run (`make test` runs it after the main suite, whose Ray cluster has ended by
then): never two Ray clusters at once. Every process is stopped by its process group id.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nnfabric
import pytest
import torch
import yaml

from services.common.redis_server import free_port, redis_binary

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is in the city of"


def render_chart(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """(the catalog ConfigMap's catalog.yaml, the RayService's serveConfigV2), as the chart renders them."""
    import helm_python as helm

    values = {
        "secrets": {"password": "pw"},
        "models": [{"name": "tiny", "source": str(model_dir), "gpus": 0, "replicas": 1,
                    "limits": {"max_batch": 4, "timeout_s": 30}}],
    }  # fmt: skip
    rendered = helm.Chart.load(str(ROOT / "deploy" / "helm" / "nnfabric")).render(values, name="fab", namespace="t")
    docs = [d for path, text in rendered.items() if not path.endswith(".txt") for d in yaml.safe_load_all(text) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-catalog")]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    return config_map["data"]["catalog.yaml"], yaml.safe_load(service["spec"]["serveConfigV2"])


@dataclass
class Cluster:
    folder: Path
    token: str
    env: dict[str, str]
    gcs: int
    dashboard: int
    client: int
    api_url: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("ab")
        # A session of its own: the process and everything it starts share one process group.
        process = subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        self.processes[name] = process
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def worker_node(self, name: str) -> None:
        self.start(name, [str(Path(sys.executable).parent / "ray"), "start",
                          f"--address=127.0.0.1:{self.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                          "--block"])  # fmt: skip

    def scheduler(self, name: str) -> None:
        """A scheduler as the chart runs it: a Ray Client of the head, named after its pod."""
        self.start(name, [sys.executable, "-m", "services.scheduler"],
                   {**self.env, "NNFABRIC_RAY_ADDRESS": f"ray://127.0.0.1:{self.client}",
                    "NNFABRIC_SCHEDULER_NAME": name})  # fmt: skip

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-4000:]


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(gpt2_dir: Path) -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="nnf-topo-", dir="/tmp"))  # short: Ray's socket paths have a limit
    catalog_text, serve_config = render_chart(gpt2_dir)
    (folder / "catalog.yaml").write_text(catalog_text)
    password, token = secrets.token_hex(12), secrets.token_hex(24)
    redis_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NNFABRIC_REDIS_URL": f"redis://:{password}@127.0.0.1:{redis_port}/0",
        "NNFABRIC_CATALOG": str(folder / "catalog.yaml"),
        "NNFABRIC_RAY_NAMESPACE": "nnfabric",
        "NNFABRIC_WATCHDOG_MARGIN_S": "2",
        # Entries never go idle long enough to be reclaimed within a test: a scheduler's entries
        # change hands only when its heartbeat lapses, which is what the takeover test shows.
        "NNFABRIC_RECLAIM_IDLE_MS": str(3600 * 1000),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    cluster = Cluster(folder, token, env, gcs=free_port(), dashboard=free_port(), client=free_port())
    ray = str(Path(sys.executable).parent / "ray")
    try:
        cluster.start("redis", [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--requirepass",
                                password, "--save", "", "--appendonly", "yes", "--dir", str(folder)])  # fmt: skip
        started = time.monotonic()
        cluster.start("ray-head", [ray, "start", "--head", f"--port={cluster.gcs}", "--node-ip-address=127.0.0.1",
                                   "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard}",
                                   f"--ray-client-server-port={cluster.client}", f"--temp-dir={folder}/ray",
                                   "--include-dashboard=true", "--block"])  # fmt: skip
        cluster.worker_node("ray-worker")
        dashboard = httpx.Client(base_url=f"http://127.0.0.1:{cluster.dashboard}",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
        wait_for(lambda: dashboard.get("/api/version").status_code == 200, 90, "the dashboard")
        # The chart's serve config, as KubeRay applies it: PUT to the dashboard's Serve REST API.
        # (Only Serve's HTTP proxy is moved off port 8000, onto a free loopback port.)
        config = {**serve_config, "http_options": {"host": "127.0.0.1", "port": free_port()}}
        unauthorised = httpx.put(f"http://127.0.0.1:{cluster.dashboard}/api/serve/applications/", json=config)
        assert unauthorised.status_code in (401, 403), unauthorised.text  # Ray's token auth is on
        reply = dashboard.put("/api/serve/applications/", json=config)
        assert reply.status_code == 200, reply.text
        api_port = free_port()
        for pod in ("scheduler-pod-a", "scheduler-pod-b"):  # the chart runs two
            cluster.scheduler(pod)
        api_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}  # the api never talks to Ray
        cluster.start("api", [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory",
                              "--no-proxy-headers", "--host", "127.0.0.1", "--port", str(api_port)], api_env)  # fmt: skip
        cluster.api_url = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: httpx.get(f"{cluster.api_url}/readyz").status_code == 200, 240, "the fabric to be ready")
        print(f"topology ready in {time.monotonic() - started:.1f} s")
        yield cluster
    except BaseException:
        for name in list(cluster.processes):
            print(f"--- {name} ---\n{cluster.log(name)}")
        raise
    finally:
        for name in [n for n in cluster.processes if n not in ("ray-head", "redis")] + ["ray-head", "redis"]:
            if name in cluster.processes:
                cluster.kill(name, signal.SIGTERM)


def make_key(cluster: Cluster, user: str) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "nnfabric-server"), "keys", "create", user], cwd=ROOT,
                          env=cluster.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def local_and_remote(model: Any, local: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with model.trace(PROMPT, remote=True):
        model.transformer.h[0].mlp.output[:, -1] = 0
        remote = model.output.logits.save()
    with local.trace(PROMPT):
        local.transformer.h[0].mlp.output[:, -1] = 0
        here = local.output.logits.save()
    return remote.value, here.value


def test_the_charts_topology_runs_a_thin_client_job_equal_to_local(cluster: Cluster, gpt2: Any) -> None:
    key = make_key(cluster, "alice")
    thin = nnfabric.connect(cluster.api_url, key, progress=False).model("tiny")
    remote, here = local_and_remote(thin, gpt2)
    assert torch.equal(remote, here)
    models = httpx.get(f"{cluster.api_url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert [(m["name"], m["state"], m["replicas"]) for m in models] == [("tiny", "ready", 1)]


def replica_pids(cluster: Cluster, model: str = "tiny") -> list[int]:
    import asyncio

    from services.common.store import Store

    async def read() -> list[int]:
        store = Store.from_url(cluster.env["NNFABRIC_REDIS_URL"])
        try:
            return await store.replica_pids(model)
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_lost_worker_node_is_reported_and_its_queued_jobs_run_when_a_node_rejoins(cluster: Cluster, gpt2: Any) -> None:
    key = make_key(cluster, "bob")
    api = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    replicas = replica_pids(cluster)
    # The node is lost with every process on it: its Ray processes (one process group) and the
    # replica's worker, which Ray starts in a session of its own.
    cluster.kill("ray-worker")
    for pid in replicas:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lost = time.monotonic()
    try:
        info = wait_for(lambda: (m := api.get("/v1/models/tiny").json())["state"] == "unavailable" and m, 120,
                        "the model to be reported unavailable")  # fmt: skip
        noticed = time.monotonic() - lost
        not_ready = httpx.get(f"{cluster.api_url}/readyz").status_code
        thin = nnfabric.connect(cluster.api_url, key, progress=False).model("tiny")
        with thin.trace(PROMPT, remote=True, blocking=False) as tracer:
            logits = thin.output.logits.save()
        job = tracer.job
        assert job is not None
        waiting = job.status()  # held in the queue, its position shown, while no replica is live
    finally:
        cluster.worker_node("ray-worker-2")  # a node rejoins (whatever happened above)
    job.wait(timeout=300)
    back = time.monotonic() - lost
    with gpt2.trace(PROMPT):
        here = gpt2.output.logits.save()
    assert torch.equal(logits.value, here.value)
    wait_for(lambda: api.get("/v1/models/tiny").json()["state"] == "ready", 60, "ready again")
    assert httpx.get(f"{cluster.api_url}/readyz").status_code == 200
    print(f"worker node lost: unavailable after {noticed:.1f} s; the queued job completed {back:.1f} s after the loss")
    assert not_ready == 503 and "jobs wait" in info["error"]
    assert waiting["state"] == "queued" and waiting.get("position") == 0, waiting


def test_a_scheduler_replaced_under_a_new_name_is_taken_over_within_seconds(cluster: Cluster) -> None:
    """Scheduler pod A dies holding queue entries; its replacement comes back under another name.
    Pod B takes A's entries over as soon as A's heartbeat lapses (not after the entries' idle
    time), nothing is lost, and nothing that ran is run again."""
    import asyncio

    from services.common.store import GROUP, Store
    from tests.support.jobs import slow_job

    async def alive() -> list[str]:
        store = Store.from_url(cluster.env["NNFABRIC_REDIS_URL"])
        try:
            return await store.alive("scheduler:")
        finally:
            await store.close()

    # Pod A may still be connecting: a Ray Client start fails now and then, and is retried.
    wait_for(lambda: "scheduler:scheduler-pod-a" in asyncio.run(alive()), 240, "pod A to hold Ray")
    key = make_key(cluster, "carol")
    api = httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    jobs = [api.post("/v1/jobs", content=slow_job(steps=20, model="tiny")).json()["id"] for _ in range(8)]

    async def held_by(consumer: str) -> int:
        store = Store.from_url(cluster.env["NNFABRIC_REDIS_URL"])
        try:
            pending = await store.redis.xpending_range("nnf:queue:tiny", GROUP, "-", "+", 100, consumername=consumer)
            return len(pending)
        finally:
            await store.close()

    wait_for(lambda: asyncio.run(held_by("scheduler-pod-a")) > 0, 30, "pod A to hold entries")
    held = asyncio.run(held_by("scheduler-pod-a"))
    cluster.kill("scheduler-pod-a")
    killed = time.monotonic()
    cluster.scheduler("scheduler-pod-c")  # the replacement pod, under a new name
    wait_for(lambda: asyncio.run(held_by("scheduler-pod-a")) == 0, 120, "pod A's entries to be taken over")
    took_over = time.monotonic() - killed
    for job_id in jobs:
        wait_for(lambda j=job_id: api.get(f"/v1/jobs/{j}").json()["state"] in ("completed", "failed"), 300,
                 "the jobs to end")  # fmt: skip
    records = [api.get(f"/v1/jobs/{j}").json() for j in jobs]
    assert [r["state"] for r in records] == ["completed"] * len(jobs)
    assert all(r.get("attempts") == 1 for r in records), [r.get("attempts") for r in records]
    print(f"scheduler pod A died holding {held} entries: taken over after {took_over:.1f} s; all {len(jobs)} jobs ran once")
