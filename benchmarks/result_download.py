"""A large saved result through the api on loopback: GB/s, and Redis's memory before and after.

    python benchmarks/result_download.py [--mib 256]

One job saves a `--mib` MiB float32 tensor (made on the replica, so the request is tiny); the
replica writes the result to the result store and the api streams it from disk. Downloaded by
curl (where installed: what the api itself delivers) and by the Python client, each in a process
of its own. Printed beside them, in the same run: reading the same file straight from disk (the
floor), and Redis's `used_memory` before the job and after the download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: tests.support

from nnfabric.graph import Graph, Invoke, Node  # noqa: E402
from nnfabric.runtime.wire import pack_request  # noqa: E402

from services.common.result_store import ResultStore  # noqa: E402
from services.common.store import Store  # noqa: E402
from services.launcher import EmbeddedFabric  # noqa: E402
from tests.support.models import build_gpt2  # noqa: E402


async def key_and_memory(url: str, make_key: bool) -> tuple[str, int]:
    store = Store.from_url(url)
    try:
        key = (await store.create_key("bench", ["*"]))[0] if make_key else ""
        return key, int((await store.redis.info("memory"))["used_memory"])
    finally:
        await store.close()


def _curl(url: str, key: str, job_id: str) -> float | None:
    """GB/s of the download with curl (the best of two), if curl is installed."""
    if shutil.which("curl") is None:
        return None
    speeds = []
    for _ in range(2):
        out = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {key}", "-w",
                              "%{speed_download}", f"{url}/v1/jobs/{job_id}/result"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        speeds.append(float(out) / 1e9)
    return max(speeds)


def download(url: str, key: str, job_id: str) -> None:
    """The result through the Python client (nnfabric's FabricClient, Range resume and all)."""
    from nnfabric.remote.http import FabricClient

    client = FabricClient(url, key, progress=False)
    start = time.perf_counter()
    size = len(client.result(job_id))
    print(json.dumps([size, time.perf_counter() - start]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--download", nargs=3, metavar=("URL", "KEY", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.download:
        download(*args.download)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_gpt2(Path(tmp, "tiny"))
        catalog = Path(tmp, "catalog.yaml")
        limits = {"max_saved_bytes": (args.mib + 16) << 20, "timeout_s": 300}
        catalog.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": f"{tmp}/tiny", "limits": limits}]}))
        fabric = EmbeddedFabric.start(catalog, result_store_dir=f"{tmp}/results")
        try:
            fabric.wait_ready()
            key, before = asyncio.run(key_and_memory(fabric.settings.redis_url, True))
            g = Graph()
            g.invokes.append(Invoke(args=["Hello"]))
            g.add(Node("output", ["transformer.h.0", 0, 0]))
            big = g.add(Node("call_function", ["torch.ones", args.mib, 256, 1024]))
            g.saves.append(big.id)
            api = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            job_id = api.post("/v1/jobs", content=pack_request(g, {}, extra={"model": "tiny"})).json()["id"]
            while (state := api.get(f"/v1/jobs/{job_id}").json()["state"]) not in ("completed", "failed"):
                time.sleep(0.2)
            assert state == "completed", api.get(f"/v1/jobs/{job_id}").json()
            # The download from a process of its own, as a researcher's client is (the api's
            # thread here would otherwise share this process's interpreter with it).
            out = subprocess.run([sys.executable, __file__, "--download", fabric.url, key, job_id],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            size, seconds = json.loads(out.strip().splitlines()[-1])
            curl_gbps = _curl(fabric.url, key, job_id)
            _, after = asyncio.run(key_and_memory(fabric.settings.redis_url, False))
            (path,) = [p for p in Path(f"{tmp}/results").iterdir() if p.suffix == ".nnfr"]
            start = time.perf_counter()
            with open(path, "rb") as handle:
                while handle.read(1 << 20):
                    pass
            disk = time.perf_counter() - start
            assert ResultStore(f"{tmp}/results").path(path.name) is not None
            print(f"result download: {size / 2**20:.0f} MiB through the api on loopback (reading the file alone: "
                  f"{size / disk / 1e9:.2f} GB/s)")  # fmt: skip
            print(f"  curl (a C client; the api's own speed): {curl_gbps:.2f} GB/s" if curl_gbps else "  curl: not installed")
            print(f"  the Python client (FabricClient.result, httpx): {size / seconds:.2e} B/s = "
                  f"{size / seconds / 1e9:.2f} GB/s")  # fmt: skip
            print(f"redis used_memory: {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after")
        finally:
            fabric.stop()


if __name__ == "__main__":
    main()
