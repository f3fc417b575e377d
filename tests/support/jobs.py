"""Jobs for the fabric's integration tests: slow and quick graphs as envelopes, and helpers that
submit, follow and wait on them over HTTP (each wait polls a state with a deadline)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import httpx
from nnfabric.graph import Graph, Invoke, Node, Ref
from nnfabric.runtime.wire import pack_request

from services.common.store import Store

CLEAN = "The Eiffel Tower is in the city of"


def slow_job(steps: int = 60, size: int = 1500, model: str = "tiny-gpt2") -> bytes:
    """A job that keeps a replica busy for seconds (chained matrix products that stay finite)."""
    g = Graph()
    g.invokes.append(Invoke(args=[CLEAN]))
    g.add(Node("output", ["transformer.h.0", 0, 0]))
    x = g.add(Node("call_function", ["torch.ones", size, size]))
    w = g.add(Node("binary", ["mul", Ref(x.id), 1.0 / size]))
    y = x
    for _ in range(steps):
        y = g.add(Node("binary", ["matmul", Ref(y.id), Ref(w.id)]))
    total = g.add(Node("call_method", ["sum", Ref(y.id)]))
    g.saves.append(total.id)
    return pack_request(g, {}, extra={"model": model})


def quick_job(model: str = "tiny-gpt2") -> bytes:
    g = Graph()
    g.invokes.append(Invoke(args=[CLEAN]))
    h = g.add(Node("output", ["transformer.h.1", 0, 0]))
    g.saves.append(h.id)
    return pack_request(g, {}, extra={"model": model})


def headers(fabric):
    return {"Authorization": f"Bearer {fabric.keys['alice']}"}


def submit(fabric, body: bytes) -> str:
    response = httpx.post(f"{fabric.url}/v1/jobs", content=body, headers=headers(fabric), timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(fabric, job_id: str) -> dict:
    for _ in range(100):  # the api may be answering 503 while Redis restarts
        response = httpx.get(f"{fabric.url}/v1/jobs/{job_id}", headers=headers(fabric), timeout=30)
        if response.status_code == 200:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(response.text)


def wait_for(predicate, timeout: float = 120, what: str | Callable[[], str] = "condition"):
    """`predicate()` once it is true; `what` (or what it returns: the state seen last) names it if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what if isinstance(what, str) else what()}")


def replica_pids(fabric, model: str = "tiny-gpt2") -> list[int]:
    async def read() -> list[int]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return await store.replica_pids(model)
        finally:
            await store.close()

    return asyncio.run(read())


def open_streams(fabric, who: str) -> int:
    """How many event streams the api counts for `who`'s key (a stream is open once counted)."""

    async def read() -> int:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            key = await store.lookup_key(fabric.keys[who])
            assert key is not None
            return await store.streams_open(key)
        finally:
            await store.close()

    return asyncio.run(read())


def kill_replica_while_running(fabric, job_id: str, spare: set[int]) -> int:
    wait_for(lambda: job(fabric, job_id)["state"] == "running", what="the job to run")
    (pid,) = wait_for(lambda: [p for p in replica_pids(fabric) if p not in spare] or None, what="a replica")
    os.kill(pid, signal.SIGKILL)
    return pid


def one_long_op(model: str, size: int) -> bytes:
    g = Graph()
    g.invokes.append(Invoke(args=[CLEAN]))
    x = g.add(Node("call_function", ["torch.ones", size, size]))
    y = g.add(Node("binary", ["matmul", Ref(x.id), Ref(x.id)]))  # one native op: seconds
    g.saves.append(g.add(Node("call_method", ["sum", Ref(y.id)])).id)
    return pack_request(g, {}, extra={"model": model})
