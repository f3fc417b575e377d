"""Replicas follow the queue: a model with min_replicas 1 and max_replicas 2 grows to two
replicas under a backlog and shrinks back to one when idle, live replicas never restarted."""

from __future__ import annotations

import time

import httpx

from tests.support.jobs import job, replica_pids, slow_job, submit, wait_for


def test_a_model_scales_up_under_load_and_back_down_when_idle(fabric):
    api = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"}, timeout=30)
    wait_for(lambda: api.get("/v1/models/tiny-auto").json()["replicas"] == 1, what="one idle replica")
    (first,) = replica_pids(fabric, "tiny-auto")
    started = time.monotonic()
    jobs = [submit(fabric, slow_job(model="tiny-auto")) for _ in range(10)]
    pids = wait_for(lambda: (p := replica_pids(fabric, "tiny-auto")) and len(p) == 2 and p, timeout=90,
                    what="a second replica")  # fmt: skip
    grew = time.monotonic() - started
    assert first in pids  # the live replica was not restarted to scale
    states = [wait_for(lambda j=j: job(fabric, j)["state"] in ("completed", "failed") and job(fabric, j)["state"],
                       what="the backlog") for j in jobs]  # fmt: skip
    assert states == ["completed"] * len(jobs)
    idle = time.monotonic()
    wait_for(lambda: len(replica_pids(fabric, "tiny-auto")) == 1, timeout=90, what="back to one replica")
    shrank = time.monotonic() - idle
    assert api.get("/v1/models/tiny-auto").json()["state"] == "ready"
    print(f"tiny-auto: 1 -> 2 replicas {grew:.1f} s into a backlog of 10 jobs; 2 -> 1 after {shrank:.1f} s idle")
