"""Sweeps on the fabric: many jobs from one call over one connection (model.sweep), and many in
one HTTP request with one event stream (POST /v1/jobs/batch); each job is still its own job,
checked against hand-written hooks, and a sweep does not starve another user."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import httpx
import nnfabric
import pytest
import torch
from nnfabric.graph.json_form import job_json_from_envelope
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from services.common.store import Store
from tests.integration.test_socket import hidden_job, local_hidden
from tests.support.jobs import slow_job
from tests.support.keys import new_key
from tests.support.oracles import ids
from tests.unit.test_sweep import PROMPT, zeroed_logits


def test_a_sweep_runs_each_job_once_within_the_keys_cap_and_matches_local_runs(fabric, gpt2_dir, gpt2):
    key = new_key(fabric.settings.redis_url, "erin", max_active=3)  # the sweep must window itself to 3 at a time
    nnfabric.connect(fabric.url, key, progress=False)
    model = nnfabric.LanguageModel(str(gpt2_dir), remote_name="tiny-gpt2")
    positions = ids(gpt2, PROMPT).shape[1]
    logits = {}
    with model.sweep(remote=True, progress=False) as sweep:
        for layer in range(2):
            for position in [*range(positions), 999]:  # position 999 does not exist: those jobs fail
                with model.trace(PROMPT):
                    model.transformer.h[layer].output[:, position] = 0
                    logits[layer, position] = model.lm_head.output[:, -1].save()
    assert len(sweep.jobs) == 2 * (positions + 1)
    failed = {index for index, _ in sweep.failed}
    assert failed == {positions, 2 * positions + 1}, sweep.failed
    for (layer, position), proxy in logits.items():
        if position == 999:
            with pytest.raises(ValueError, match="job failed"):
                _ = proxy.value
            continue
        assert torch.allclose(proxy.value, zeroed_logits(gpt2, layer, position), atol=1e-5)
    records = [job.status() for job in sweep.jobs if job is not None]
    assert len({r["id"] for r in records}) == len(records)
    assert all(r.get("attempts") == 1 for r in records)  # each its own job, run once
    # The failure is the failing job's own, with the line that recorded it.
    error = sweep.failed[0][1]
    assert error.line is not None and "output[:, position] = 0" in error.line.code, error.line


def test_a_sweep_whose_socket_is_refused_runs_every_job_over_http(fabric, gpt2_dir, gpt2):
    key = new_key(fabric.settings.redis_url, "ivan", max_streams=1)
    nnfabric.connect(fabric.url, key, progress=False)
    model = nnfabric.LanguageModel(str(gpt2_dir), remote_name="tiny-gpt2")
    headers = {"Authorization": f"Bearer {key}"}
    url = fabric.url.replace("http://", "ws://")
    # Another job socket of the same key, left open, holds its only stream: the sweep's socket is
    # refused (4429) after it may have sent jobs, and every job must still run, over HTTP.
    with connect(f"{url}/v1/socket", additional_headers=headers) as other:
        other.send(json.dumps({"cancel": "0" * 32}))  # answered once the socket is accepted
        other.recv(timeout=30)
        saved = {}
        with model.sweep(remote=True, progress=False) as sweep:
            for position in range(3):
                with model.trace(PROMPT):
                    model.transformer.h[0].output[:, position] = 0
                    saved[position] = model.lm_head.output[:, -1].save()
    assert not sweep.failed and len(sweep.jobs) == 3
    for position, proxy in saved.items():
        assert torch.allclose(proxy.value, zeroed_logits(gpt2, 0, position), atol=1e-5)


def test_many_jobs_in_one_request_with_one_event_stream(fabric, gpt2):
    alice = {"Authorization": f"Bearer {fabric.keys['alice']}"}
    prompts = ["The Eiffel Tower is in the city of", "Alice went to the market", "One two three"]
    jobs = [job_json_from_envelope(hidden_job(p)) for p in prompts]
    jobs.insert(1, {"model": "tiny-gpt2", "graph": {"nodes": "not a list"}})  # refused on its own
    jobs.append({"model": "no-such-model", **{k: v for k, v in jobs[0].items() if k != "model"}})
    reply = httpx.post(f"{fabric.url}/v1/jobs/batch", json={"jobs": jobs}, headers=alice, timeout=30)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["accepted"] == 3
    items = body["jobs"]
    assert [item["index"] for item in items] == list(range(5))
    assert items[1]["status"] == 422 and items[4]["status"] == 404 and "id" not in items[1]
    accepted = {items[i]["id"]: prompt for i, prompt in zip((0, 2, 3), prompts, strict=True)}

    url = fabric.url.replace("http://", "ws://") + body["events"] + "?result=json"
    seen: dict[str, list[str]] = {}
    values: dict[str, dict] = {}
    with connect(url, additional_headers=alice, max_size=None) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = json.loads(ws.recv(timeout=120))
                if message["type"] == "result":
                    values[message["job"]] = message["values"]
                else:
                    seen.setdefault(message["job"], []).append(message["type"])
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000  # closed once all ended
    assert set(seen) == set(accepted) and all(types[-1] == "completed" for types in seen.values())
    for job_id, prompt in accepted.items():
        (value,) = values[job_id].values()
        assert value["dtype"] == "float32"
        got = torch.frombuffer(bytearray(base64.b64decode(value["data"])), dtype=torch.float32).reshape(value["shape"])
        expected = local_hidden(gpt2, prompt)
        assert torch.allclose(got[:, -expected.shape[1] :], expected, atol=1e-5)


def test_a_batch_is_its_owners_and_its_body_is_checked(fabric):
    alice = {"Authorization": f"Bearer {fabric.keys['alice']}"}
    bob = {"Authorization": f"Bearer {fabric.keys['bob']}"}
    one = job_json_from_envelope(hidden_job("One two three"))
    reply = httpx.post(f"{fabric.url}/v1/jobs/batch", json={"jobs": [one]}, headers=alice, timeout=30)
    assert reply.status_code == 202
    url = fabric.url.replace("http://", "ws://") + reply.json()["events"]
    with connect(url, additional_headers=bob) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404  # bob cannot follow alice's batch

    def post(**kw):  # type: ignore[no-untyped-def]
        return httpx.post(f"{fabric.url}/v1/jobs/batch", timeout=30, **{"headers": alice, **kw})

    assert post(content=b"\x00\x01", headers={**alice, "Content-Type": "application/octet-stream"}).status_code == 415
    assert post(json={"jobs": []}).status_code == 413
    assert post(json={"jobs": [one] * (fabric.settings.max_batch_jobs + 1)}).status_code == 413
    assert post(json=[one]).status_code == 422
    assert post(content=b'{"jobs": [', headers={**alice, "Content-Type": "application/json"}).status_code == 422
    assert post(json={"jobs": [one], "extra": 1}).status_code == 422


def test_a_sweep_does_not_starve_another_user(fabric):
    """Alice's batch fills the queue with slow jobs; bob's one job, submitted behind them, runs
    within the next couple of batches (fair share), not after alice's backlog (first come)."""
    alice = {"Authorization": f"Bearer {fabric.keys['alice']}"}
    bob = {"Authorization": f"Bearer {fabric.keys['bob']}"}
    slow = job_json_from_envelope(slow_job(steps=4, size=600))
    reply = httpx.post(f"{fabric.url}/v1/jobs/batch", json={"jobs": [slow] * 40}, headers=alice, timeout=60)
    assert reply.status_code == 202 and reply.json()["accepted"] == 40, reply.text
    sweep_ids = [item["id"] for item in reply.json()["jobs"]]
    bobs = httpx.post(f"{fabric.url}/v1/jobs", content=hidden_job("One two three"), headers=bob, timeout=30)
    assert bobs.status_code == 202
    bob_id = bobs.json()["id"]

    done = threading.Event()
    url = fabric.url.replace("http://", "ws://") + reply.json()["events"]
    with connect(url, additional_headers=alice) as ws:
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=300)
    done.set()
    started = _running_times(fabric, [*sweep_ids, bob_id])
    bob_queued, bob_running = _queued_time(fabric, bob_id), started[bob_id]
    ahead = [j for j in sweep_ids if bob_queued < started[j] < bob_running]
    behind = [j for j in sweep_ids if started[j] > bob_running]
    print(f"alice's jobs started between bob's submission and his start: {len(ahead)}; after him: {len(behind)}")
    assert len(ahead) <= 2 * 4, len(ahead)  # at most a batch in flight and the next (max_batch 4)
    assert behind  # the backlog was real: some of alice's jobs ran after bob's


def _events(fabric, job_id: str) -> list[tuple[str, int]]:
    async def read() -> list[tuple[str, int]]:
        store = Store.from_url(fabric.settings.redis_url)
        try:
            return [(e["type"], int(e["id"].split("-")[0])) for e in await store.events(job_id)]
        finally:
            await store.close()

    return asyncio.run(read())


def _running_times(fabric, job_ids: list[str]) -> dict[str, int]:
    return {j: next(t for kind, t in _events(fabric, j) if kind == "running") for j in job_ids}


def _queued_time(fabric, job_id: str) -> int:
    return next(t for kind, t in _events(fabric, job_id) if kind == "queued")
