"""Where the scheduler holds its Ray connection: as a Ray Client of the head (what the chart and
compose do) or as a driver attached to the cluster directly. Same run, same cluster.

    python benchmarks/ray_connection.py [--calls 200] [--connects 5]

Starts a Ray head (no CPUs, with the Ray Client server, token authentication on) and a worker
node with `ray start`, deploys a no-op Serve replica, then, from a fresh process per mode:
the time to connect, and the p50/p95 of a Serve handle call awaited the way the scheduler
awaits a replica. Every process is stopped by its process group id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.redis_server import free_port  # noqa: E402


def client_main(address: str, calls: int) -> None:
    """One process: connect, then time handle calls; prints one JSON line."""
    import asyncio

    import ray
    from ray import serve

    start = time.perf_counter()
    ray.init(address=address, namespace="bench", log_to_driver=False)
    connect = time.perf_counter() - start
    handle = serve.get_deployment_handle("Noop", app_name="noop")

    async def measure() -> list[float]:
        times = []
        for i in range(calls + 5):
            begin = time.perf_counter()
            await handle.run_batch.remote([])
            if i >= 5:
                times.append(time.perf_counter() - begin)
        return times

    print(json.dumps({"connect": connect, "calls": asyncio.run(measure())}))


def deploy_noop(address: str) -> None:
    import ray
    from ray import serve

    ray.init(address=address, namespace="bench", log_to_driver=False)

    @serve.deployment(max_ongoing_requests=2, ray_actor_options={"num_cpus": 0})
    class Noop:
        async def run_batch(self, job_ids: list[str]) -> dict[str, str]:
            return {}

    serve.start(proxy_location="Disabled")
    serve.run(Noop.bind(), name="noop", route_prefix=None)  # type: ignore[attr-defined]
    print("deployed", flush=True)
    time.sleep(3600)  # held until the benchmark ends, as an operator's deployment would be


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--connects", type=int, default=5)
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--deploy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client[0], int(args.client[1]))
        return
    if args.deploy:
        deploy_noop(args.deploy)
        return
    folder = Path(tempfile.mkdtemp(prefix="nnf-rc-", dir="/tmp"))
    gcs, client = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24), "PYTHONPATH": str(ROOT)}
    ray = str(Path(sys.executable).parent / "ray")
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str]) -> None:
        log = (folder / f"{len(processes)}.log").open("ab")
        processes.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    try:
        start([ray, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
               "--include-dashboard=false", f"--ray-client-server-port={client}", f"--temp-dir={folder}/ray",
               "--block"])  # fmt: skip
        time.sleep(8)
        start([ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--block"])
        time.sleep(8)
        start([sys.executable, __file__, "--deploy", f"127.0.0.1:{gcs}"])
        deadline = time.monotonic() + 120
        while "deployed" not in (folder / f"{len(processes) - 1}.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the no-op deployment did not start")
            time.sleep(0.5)
        print(f"uptime: {os.getloadavg()[0]:.2f} (1-minute load average)")
        for label, address in [("Ray Client (ray://, as the chart runs it)", f"ray://127.0.0.1:{client}"),
                               ("driver attached to the cluster", f"127.0.0.1:{gcs}")]:  # fmt: skip
            connects, calls = [], []
            for _ in range(args.connects):
                out = subprocess.run([sys.executable, __file__, "--client", address, str(args.calls)], env=env,
                                     capture_output=True, text=True, timeout=300)  # fmt: skip
                if out.returncode != 0:
                    print(f"{label}: a connection failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                found = json.loads(out.stdout.strip().splitlines()[-1])
                connects.append(found["connect"])
                calls.extend(found["calls"])
            if calls:
                print(f"{label}: connect p50 {percentile(connects, 0.5):.2f} s over {len(connects)} starts; "
                      f"Serve handle call p50 {percentile(calls, 0.5) * 1e3:.2f} ms "
                      f"p95 {percentile(calls, 0.95) * 1e3:.2f} ms")  # fmt: skip
        print(f"uptime: {os.getloadavg()[0]:.2f} (1-minute load average)")
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
