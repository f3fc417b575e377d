"""Large results live on the result store, not in Redis: served from disk with Range (a dropped
download resumes), under the same ownership check, gone with their TTL; Redis memory stays flat."""

from __future__ import annotations

import asyncio

import httpx
import torch
from nnfabric.graph import Graph, Invoke, Node
from nnfabric.remote.http import FabricClient
from nnfabric.runtime.wire import pack_request, unpack_result

from services.common.result_store import ResultStore
from services.common.store import Store
from tests.support.jobs import job, submit, wait_for

CLEAN = "The Eiffel Tower is in the city of"


def big_job(rows: int = 700) -> bytes:
    """Saves a rows x 700 float32 tensor of ones (700 rows: 1.96 MB, over the test fabric's 1 MiB)."""
    g = Graph()
    g.invokes.append(Invoke(args=[CLEAN]))
    g.add(Node("output", ["transformer.h.0", 0, 0]))
    ones = g.add(Node("call_function", ["torch.ones", rows, 700]))
    g.saves.append(ones.id)
    return pack_request(g, {}, extra={"model": "tiny-gpt2"})


def redis_memory(fabric) -> int:  # type: ignore[no-untyped-def]
    async def read() -> int:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return int((await store.redis.info("memory"))["used_memory"])
        finally:
            await store.close()

    return asyncio.run(read())


def stored(fabric, job_id: str) -> tuple[bytes | None, str | None]:  # type: ignore[no-untyped-def]
    async def read() -> tuple[bytes | None, str | None]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return await store.result(job_id), await store.result_file(job_id)
        finally:
            await store.close()

    return asyncio.run(read())


def done(fabric, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    return wait_for(lambda: job(fabric, job_id)["state"] in ("completed", "failed") and job(fabric, job_id),
                    what="the job")  # fmt: skip


def test_a_large_result_is_served_from_disk_with_range_and_only_to_its_owner(fabric):
    alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"}, timeout=60)
    before = redis_memory(fabric)
    ids = [submit(fabric, big_job()) for _ in range(3)]
    records = [done(fabric, job_id) for job_id in ids]
    assert [r["state"] for r in records] == ["completed"] * 3 and "result_file" not in records[0]
    after = redis_memory(fabric)
    assert after - before < 1 << 20, (before, after)  # 3 x 1.96 MB of results, none of it in Redis
    job_id = ids[0]
    in_redis, name = stored(fabric, job_id)
    assert in_redis is None and name is not None
    path = ResultStore(fabric.settings.result_store_dir).path(name)
    whole = alice.get(f"/v1/jobs/{job_id}/result")
    assert whole.status_code == 200 and whole.headers.get("accept-ranges") == "bytes"
    assert path is not None and path.stat().st_size == len(whole.content) > 1 << 20
    (value,) = unpack_result(whole.content).values()
    assert torch.equal(value, torch.ones(700, 700))
    tail = alice.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206 and tail.content == whole.content[1000:]
    head = alice.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=0-99"})
    assert head.status_code == 206 and head.content == whole.content[:100]
    as_json = alice.get(f"/v1/jobs/{job_id}/result", headers={"Accept": "application/json"})
    assert as_json.status_code == 200 and as_json.json()["values"][str(next(iter(unpack_result(whole.content))))]

    # A download that dropped after 12345 bytes resumes from there (Range), and gets it all.
    client = FabricClient(fabric.url, fabric.keys["alice"], progress=False)
    dropping = DropsFirstResult(after=12345)
    client.http = httpx.Client(
        base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"}, transport=dropping, timeout=60
    )
    assert client.result(job_id) == whole.content
    assert dropping.ranges == [None, "bytes=12345-"]

    bob = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['bob']}"}, timeout=60)
    assert bob.get(f"/v1/jobs/{job_id}/result").status_code == 404
    assert bob.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=0-"}).status_code == 404

    # Past its TTL the file is swept, and the result is gone.
    assert ResultStore(fabric.settings.result_store_dir).sweep(ttl_s=0) >= 3
    gone = alice.get(f"/v1/jobs/{job_id}/result")
    assert gone.status_code == 404 and "expired" in gone.json()["detail"]


def test_a_small_result_still_rides_in_redis(fabric):
    job_id = submit(fabric, big_job(rows=10))
    assert done(fabric, job_id)["state"] == "completed"
    in_redis, name = stored(fabric, job_id)
    assert in_redis is not None and name is None


class DropsFirstResult(httpx.BaseTransport):
    """A real connection whose first result download breaks off after `after` bytes."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.real = httpx.HTTPTransport()
        self.ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.real.handle_request(request)
        if not request.url.path.endswith("/result"):
            return response
        self.ranges.append(request.headers.get("range"))
        if len(self.ranges) > 1:
            return response
        return httpx.Response(response.status_code, headers=response.headers, stream=_Broken(response, self.after))


class _Broken(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response, after: int) -> None:
        self.response = response
        self.after = after

    def __iter__(self):  # type: ignore[no-untyped-def]
        sent = 0
        for chunk in self.response.stream:  # type: ignore[union-attr]
            chunk = chunk[: self.after - sent]
            sent += len(chunk)
            yield chunk
            if sent >= self.after:
                break
        self.response.close()
        raise httpx.ReadError("connection dropped")
