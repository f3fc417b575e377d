"""An honest researcher's loop: N small sequential traces on the fabric with a default key.

    python benchmarks/sequential.py --jobs 1000

Prints how long the loop took, the p50/p95 of one job, how many requests were refused (429),
and the same trace run locally as the baseline (the ratio is what to judge: the machine is noisy).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"


def main(jobs: int = typer.Option(1000, help="sequential traces")) -> None:
    import os

    import nnfabric
    import yaml

    from services.common.store import Store

    print(f"uptime: {os.getloadavg()}")
    folder = Path(tempfile.mkdtemp())
    build_gpt2(folder / "model")
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": str(folder / "model")}]}))
    fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(folder / "redis"))
    try:
        fabric.wait_ready()

        async def default_key() -> str:
            store = Store.from_url(fabric.settings.redis_url)
            key, _ = await store.create_key("researcher", ["*"])  # the defaults, as `keys create` makes them
            await store.close()
            return key

        nnfabric.connect(fabric.url, asyncio.run(default_key()), progress=False)
        model = nnfabric.LanguageModel(str(folder / "model"), remote_name="tiny")

        def one(remote: bool) -> float:
            start = time.perf_counter()
            with model.trace(PROMPT, remote=remote):
                model.transformer.h[1].output[:, -1] *= 0.5
                model.output.logits[0, -1].save()
            return time.perf_counter() - start

        local = [one(False) for _ in range(50)]
        refused = 0
        times = []
        loop_start = time.perf_counter()
        for _ in range(jobs):
            try:
                times.append(one(True))
            except nnfabric.RemoteError as exc:
                refused += exc.status == 429
        total = time.perf_counter() - loop_start
        p50, p95 = statistics.median(times), sorted(times)[int(len(times) * 0.95) - 1]
        print(f"local trace p50 {statistics.median(local) * 1000:.1f} ms (baseline)")
        print(f"{jobs} sequential remote traces: {total:.1f} s, {jobs / total:.1f} jobs/s; one job p50 "
              f"{p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms; refused (429): {refused}")  # fmt: skip
        print(f"remote/local p50: {p50 / statistics.median(local):.1f}x")
        print(f"uptime: {os.getloadavg()}")
    finally:
        fabric.stop()


if __name__ == "__main__":
    typer.run(main)
