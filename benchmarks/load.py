"""Load: 10,000 jobs from 16 users through the real stack on this machine; nothing lost, and
Redis's memory back where it started once the jobs' records and results expire.

    python benchmarks/load.py [--jobs 10000] [--users 16] [--ttl 30]

Each user (a key of its own) sends its share as a sweep over one connection from a client
process (nnfabric.remote.sweep). Every job saves one layer's output for one of a few prompts;
every result is checked against the same prompt run by the executor in this process. Redis's
`used_memory` is printed before, every few seconds during the run, at the end, and after the
result TTL (`--ttl` seconds, shortened from a day for the benchmark) has passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support, services

from nnfabric.graph import Graph, Invoke, Node  # noqa: E402
from nnfabric.runtime.wire import pack_request  # noqa: E402

from services.common.store import Store  # noqa: E402
from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402

PROMPTS = ["The Eiffel Tower is in the city of", "Alice went to the market", "One two three four", "Hello"]


def job(prompt: str) -> bytes:
    g = Graph()
    g.invokes.append(Invoke(args=[prompt]))
    h = g.add(Node("output", ["transformer.h.1", 0, 0]))
    g.saves.append(h.id)
    return pack_request(g, {}, extra={"model": "tiny"})


def users_main(url: str, keys: list[str], jobs: int) -> None:
    """Every user's sweep at once, one thread and one connection each. Prints one JSON line:
    per job, its prompt's index, its id and its result's checksum (or its error)."""
    import torch
    from nnfabric.remote.http import FabricClient
    from nnfabric.remote.sweep import SocketSender
    from nnfabric.runtime.wire import unpack_values

    found: list[dict[str, Any]] = []
    lock = threading.Lock()

    def user(index: int, key: str) -> None:
        share = jobs // len(keys) + (1 if index < jobs % len(keys) else 0)
        prompts = [(index + i) % len(PROMPTS) for i in range(share)]

        def ended(i: int, job_id: str | None, result: bytes | None, error: Any) -> None:
            record: dict[str, Any] = {"prompt": prompts[i], "id": job_id}
            if result is not None:
                (value,) = unpack_values(result).values()
                record["sum"] = float(torch.as_tensor(value).double().sum())
            else:
                record["error"] = str(error)
            with lock:
                found.append(record)

        SocketSender(FabricClient(url, key, progress=False)).run([job(PROMPTS[p]) for p in prompts], ended)

    threads = [threading.Thread(target=user, args=(i, key)) for i, key in enumerate(keys)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(found))


async def _redis(url: str, make_keys: int = 0) -> tuple[list[str], int, int]:
    store = Store.from_url(url)
    try:
        keys = [(await store.create_key(f"user{i}", ["*"]))[0] for i in range(make_keys)]
        info = await store.redis.info("memory")
        return keys, int(info["used_memory"]), int(await store.redis.dbsize())
    finally:
        await store.close()


def expected_sums(model_dir: Path) -> dict[int, float]:
    """Each prompt's value, run by the plain executor path in this process (the oracle)."""
    import nnfabric
    import torch

    model = nnfabric.LanguageModel(str(model_dir))
    sums = {}
    for index, prompt in enumerate(PROMPTS):
        with model.trace(prompt):
            hidden = model.transformer.h[1].output.save()
        sums[index] = float(torch.as_tensor(hidden.value).double().sum())
    return sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--ttl", type=int, default=30)
    parser.add_argument("--users-of", nargs=2, metavar=("URL", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.users_of:
        users_main(args.users_of[0], args.users_of[1].split(","), args.jobs)
        return
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"uptime before: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "tiny")
        build_gpt2(model_dir)
        catalog = Path(tmp, "catalog.yaml")
        catalog.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": str(model_dir),
                                                        "limits": {"max_batch": 16}}]}))  # fmt: skip
        fabric = EmbeddedFabric.start(catalog, redis_data_dir=str(Path(tmp, "redis")), result_ttl_s=args.ttl)
        try:
            fabric.wait_ready()
            url = fabric.settings.redis_url
            keys, before, before_keys = asyncio.run(_redis(url, args.users))
            print(f"redis before: used_memory {before / 2**20:.1f} MiB, {before_keys} keys")
            command = [sys.executable, __file__, "--jobs", str(args.jobs), "--users-of", fabric.url, ",".join(keys)]
            start = time.perf_counter()
            report = Path(tmp, "users.json")
            with open(report, "w") as sink:
                client = subprocess.Popen(command, stdout=sink, text=True)
            peak = 0
            while client.poll() is None:
                _, used, count = asyncio.run(_redis(url))
                peak = max(peak, used)
                print(f"  {time.perf_counter() - start:6.1f} s: used_memory {used / 2**20:.1f} MiB, {count} keys")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    client.wait(5)
            wall = time.perf_counter() - start
            assert client.returncode == 0, "the users' process failed"
            found = json.loads(report.read_text().strip().splitlines()[-1])
            _, end, end_keys = asyncio.run(_redis(url))
            oracle = expected_sums(model_dir)
            errors = [f for f in found if "error" in f]
            wrong = [f for f in found if "sum" in f and abs(f["sum"] - oracle[f["prompt"]]) > 1e-3]
            ids = [f["id"] for f in found if f.get("id")]
            print(f"{len(found)} of {args.jobs} jobs ended in {wall:.1f} s ({len(found) / wall:.0f} jobs/s) from "
                  f"{args.users} users; {len(errors)} failed, {len(wrong)} results differ from the oracle, "
                  f"{len(ids) - len(set(ids))} ids repeated")  # fmt: skip
            print(f"redis at the end: used_memory {end / 2**20:.1f} MiB, {end_keys} keys (peak {peak / 2**20:.1f} MiB)")
            time.sleep(args.ttl + 5)  # the benchmark waits out the TTL it set: Redis's expiry is the subject
            _, after, after_keys = asyncio.run(_redis(url))
            print(f"redis {args.ttl + 5} s later (past the TTL): used_memory {after / 2**20:.1f} MiB, {after_keys} keys "
                  f"(before the run: {before / 2**20:.1f} MiB, {before_keys} keys)")  # fmt: skip
        finally:
            fabric.stop()
    print(f"uptime after: {uptime()}")


if __name__ == "__main__":
    main()
