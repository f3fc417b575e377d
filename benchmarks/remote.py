"""The fabric's overhead over local execution, and its throughput, on loopback.

    python benchmarks/remote.py [--jobs 40] [--models tiny,small] [--per-client 8]

For the tiny GPT-2 and a GPT-2-small-shaped model: p50/p95 latency of a one-prompt patching
job run locally and through the fabric (api -> Redis -> scheduler -> Ray Serve -> Redis ->
websocket); jobs/s one at a time beside 16 concurrent clients (each running --per-client jobs)
against one replica, for the patching trace and for a 16-token greedy generation that steers
one layer at every step (tokens/s too). The last lines are the figures and their ratios:
`overhead/floors`, `trace throughput`, `generate throughput`.

The client runs in a process of its own, as a researcher's would (sharing the fabric's process
and its GIL skews both). Beside the overhead it prints the floors the fabric stands on, measured
in the same run: one bare Ray Serve handle call (a no-op deployment, called like the scheduler
calls a replica) and one bare HTTP round trip to the api (GET /healthz).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support
sys.path.insert(0, str(ROOT / "benchmarks"))

import nnfabric  # noqa: E402
from overhead import small_model  # noqa: E402

from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.keys import new_key  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"


def patch_job(model: nnfabric.LanguageModel, remote: bool) -> float:
    start = time.perf_counter()
    with model.trace(PROMPT, remote=remote):
        h = model.transformer.h[0].output
        model.transformer.h[0].output[:, -1] = h[:, -1] * 0.5
        model.output.logits[0, -1].save()
    return time.perf_counter() - start


def generate_job(model: nnfabric.LanguageModel, remote: bool) -> float:
    """A 16-token greedy generation that steers one layer at every step."""
    start = time.perf_counter()
    with model.generate(PROMPT, max_new_tokens=NEW_TOKENS, remote=remote) as tracer:
        with tracer.all():
            h = model.transformer.h[0].output
            model.transformer.h[0].output[:, -1] = h[:, -1] * 1.5
        tracer.output.save()
    return time.perf_counter() - start


NEW_TOKENS = 16
CLIENTS = 16


def throughput(run: object, models: list[nnfabric.LanguageModel], jobs: int) -> float:
    """Jobs/s over `jobs` jobs spread over len(models) client threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(run, [models[i % len(models)] for i in range(jobs)], [True] * jobs))  # type: ignore[arg-type]
    return jobs / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client_main(url: str, key: str, name: str, path: str, jobs: int, per_client: int) -> None:
    """The researcher's side, in its own process: prints one JSON line of timings."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    host = urlsplit(url)
    session = nnfabric.connect(url, key, progress=False)
    model = nnfabric.LanguageModel(path, remote_name=name)
    for _ in range(3):
        patch_job(model, False)
        patch_job(model, True)
    local, remote, http = [], [], []
    for _ in range(jobs):
        local.append(patch_job(model, False))
        remote.append(patch_job(model, True))
        start = time.perf_counter()
        connection = HTTPConnection(host.hostname or "127.0.0.1", host.port)  # a fresh one, as a websocket's is
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        http.append(time.perf_counter() - start)
        connection.close()
    serial = throughput(patch_job, [model], jobs)
    # A trace belongs to one model object, so each client thread has its own thin one.
    clients = [session.model(name) for _ in range(CLIENTS)]
    concurrent = throughput(patch_job, clients, CLIENTS * per_client)
    for _ in range(2):
        generate_job(model, True)
    gen_serial = throughput(generate_job, [model], max(4, jobs // 4))
    gen_concurrent = throughput(generate_job, clients, CLIENTS * per_client)
    print(json.dumps({"local": local, "remote": remote, "http": http, "serial": serial, "concurrent": concurrent,
                      "gen_serial": gen_serial, "gen_concurrent": gen_concurrent}))  # fmt: skip


def serve_floor(calls: int) -> list[float]:
    """Round trips of a bare Ray Serve handle call to a no-op replica, awaited from an event loop
    in another process than the replica's (this one; the scheduler is another such process)."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0})
    class Noop:
        async def run_batch(self, job_ids: list[str]) -> dict[str, str]:
            return {}

    handle = serve.run(Noop.bind(), name="floor", route_prefix=None)  # type: ignore[attr-defined]

    async def measure() -> list[float]:
        times = []
        for i in range(calls + 3):
            start = time.perf_counter()
            await handle.run_batch.remote([])
            if i >= 3:
                times.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)
        return times

    try:
        return asyncio.run(measure())
    finally:
        serve.delete("floor")


def ms(values: list[float], q: float = 0.5) -> str:
    return f"{percentile(values, q) * 1e3:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--models", default="tiny,small", help="which of tiny,small to measure")
    parser.add_argument("--per-client", type=int, default=8, help="jobs per client in the 16-client phases")
    parser.add_argument("--client", nargs=4, metavar=("URL", "KEY", "NAME", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        url, key, name, path = args.client
        client_main(url, key, name, path, args.jobs, args.per_client)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tiny, small = Path(tmp, "tiny"), Path(tmp, "small")
        build_gpt2(tiny)
        small_model(small)
        catalog = Path(tmp, "catalog.yaml")
        wanted = args.models.split(",")
        entries = [
            {"name": n, "source": str(p), "limits": {"max_batch": 16}}
            for n, p in [("tiny", tiny), ("small", small)]
            if n in wanted
        ]
        catalog.write_text(yaml.safe_dump({"models": entries}))
        fabric = EmbeddedFabric.start(catalog)
        try:
            fabric.wait_ready()
            key = new_key(fabric.settings.redis_url, "bench", max_active=1000)
            floor = serve_floor(args.jobs)  # the same for every model: measured once
            print(f"floors: bare Serve handle call p50 {ms(floor)}  p95 {ms(floor, 0.95)}")
            for name, path in [("tiny", tiny), ("small", small)]:
                if name not in wanted:
                    continue
                command = [sys.executable, __file__, "--jobs", str(args.jobs), "--per-client", str(args.per_client),
                           "--client", fabric.url, key, name]  # fmt: skip
                out = subprocess.run([*command, str(path)], check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                local, remote = r["local"], r["remote"]
                p50_local, p50_remote = percentile(local, 0.5), percentile(remote, 0.5)
                overhead = p50_remote - p50_local
                print(f"\n{name}: one-prompt patching job, {args.jobs} runs each (client in its own process)")
                print(f"  local   p50 {ms(local)}  p95 {ms(local, 0.95)}")
                print(f"  remote  p50 {ms(remote)}  p95 {ms(remote, 0.95)}")
                print(f"  remote overhead p50 {overhead * 1e3:.2f} ms ({p50_remote / p50_local:.2f}x local)")
                print(f"  bare HTTP round trip p50 {ms(r['http'])}  p95 {ms(r['http'], 0.95)}")
                print(f"  overhead / Serve call p50: {overhead / percentile(floor, 0.5):.2f}x")
                serial, concurrent = r["serial"], r["concurrent"]
                gen_serial, gen_concurrent = r["gen_serial"], r["gen_concurrent"]
                floors = percentile(floor, 0.5) + percentile(r["http"], 0.5)
                print(f"  overhead/floors: {overhead * 1e3:.2f} ms / ({ms(floor).strip()} Serve + "
                      f"{ms(r['http']).strip()} HTTP) = {overhead / floors:.2f}")  # fmt: skip
                print(f"  trace throughput: one at a time {serial:.1f} jobs/s; {CLIENTS} clients x "
                      f"{args.per_client} jobs {concurrent:.1f} jobs/s = {concurrent / serial:.2f}x")  # fmt: skip
                print(f"  generate throughput: one at a time {gen_serial:.1f} jobs/s "
                      f"({gen_serial * NEW_TOKENS:.0f} tokens/s); {CLIENTS} clients x {args.per_client} jobs "
                      f"{gen_concurrent:.1f} jobs/s ({gen_concurrent * NEW_TOKENS:.0f} tokens/s) = "
                      f"{gen_concurrent / gen_serial:.2f}x")  # fmt: skip
        finally:
            fabric.stop()


if __name__ == "__main__":
    main()
