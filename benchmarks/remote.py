"""The fabric's overhead over local execution, and its throughput, on loopback.

    python benchmarks/remote.py [--jobs 40]

For the tiny GPT-2 and a GPT-2-small-shaped model: p50/p95 latency of a one-prompt patching
job run locally and through the fabric (api -> Redis -> scheduler -> Ray Serve -> Redis ->
websocket), and jobs/s one at a time beside 16 concurrent clients against one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nnfabric  # noqa: E402
from models import build_gpt2  # noqa: E402
from overhead import small_model  # noqa: E402

from services.launcher import EmbeddedFabric  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"


def patch_job(model: nnfabric.LanguageModel, remote: bool) -> float:
    start = time.perf_counter()
    with model.trace(PROMPT, remote=remote):
        h = model.transformer.h[0].output
        model.transformer.h[0].output[:, -1] = h[:, -1] * 0.5
        model.output.logits[0, -1].save()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def make_key(url: str) -> str:
    from redis.asyncio import Redis

    from services.common.store import Store

    store = Store(Redis.from_url(url))
    key, _ = await store.create_key("bench", ["*"], rate_limit=1_000_000)
    await store.redis.aclose()
    return key


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--models", default="tiny,small", help="which of tiny,small to measure")
    args = parser.parse_args()
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
            session = nnfabric.connect(fabric.url, asyncio.run(make_key(fabric.settings.redis_url)), progress=False)
            for name, path in [("tiny", tiny), ("small", small)]:
                if name not in wanted:
                    continue
                model = nnfabric.LanguageModel(str(path), remote_name=name)
                for _ in range(3):
                    patch_job(model, False)
                    patch_job(model, True)
                local, remote = [], []
                for _ in range(args.jobs):
                    local.append(patch_job(model, False))
                    remote.append(patch_job(model, True))
                p50l, p50r = statistics.median(local), statistics.median(remote)
                print(f"\n{name}: one-prompt patching job, {args.jobs} runs each")
                print(f"  local   p50 {p50l * 1e3:8.2f} ms  p95 {percentile(local, 0.95) * 1e3:8.2f} ms")
                print(f"  remote  p50 {p50r * 1e3:8.2f} ms  p95 {percentile(remote, 0.95) * 1e3:8.2f} ms")
                print(f"  remote overhead p50 {(p50r - p50l) * 1e3:.2f} ms ({p50r / p50l:.2f}x)")
                start = time.perf_counter()
                for _ in range(args.jobs):
                    patch_job(model, True)
                serial = args.jobs / (time.perf_counter() - start)
                start = time.perf_counter()
                # A trace belongs to one model object, so each client thread has its own thin one.
                clients = [session.model(name) for _ in range(16)]
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(patch_job, [clients[i % 16] for i in range(args.jobs)], [True] * args.jobs))
                concurrent = args.jobs / (time.perf_counter() - start)
                print(
                    f"  throughput: one at a time {serial:.1f} jobs/s; 16 clients {concurrent:.1f} jobs/s ({concurrent / serial:.2f}x)"
                )
        finally:
            fabric.stop()


if __name__ == "__main__":
    main()
