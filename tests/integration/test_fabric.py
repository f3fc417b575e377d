"""The fabric end to end: real Redis, Ray Serve, scheduler process and uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import time

import httpx
import nnfabric
import pytest
import torch
from nnfabric.graph import Graph, Invoke, Node, Ref
from nnfabric.remote.http import FabricClient
from nnfabric.runtime.wire import pack_request
from websockets.sync.client import connect as ws_connect

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


def patching(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(CLEAN):
            clean = model.transformer.h[-1].output[:, -1].save()
        with tracer.invoke(CORRUPT):
            model.transformer.h[-1].output[:, -1] = clean
            logits = model.output.logits[0, -1].save()
    return clean.value, logits.value


def attribution(model, remote):
    paris = model.tokenizer(" Paris")["input_ids"][0]
    with model.trace(CLEAN, remote=remote):
        h = model.transformer.h[0].output
        model.output.logits[0, -1, paris].backward()
        grad = h.grad.save()
        score = (h.grad * h).sum(-1).save()
    return grad.value, score.value


def steered(model, remote):
    with model.generate(CLEAN, max_new_tokens=4, remote=remote) as tracer:
        with tracer.iter[1]:
            model.transformer.h[0].output[:, -1] = 0
        out = tracer.output.save()
    return (out.value,)


def session_steering(model, remote):
    with model.session(remote=remote):
        with model.trace(CLEAN):
            vector = model.transformer.h[1].output[0, -1]
        with model.generate(CORRUPT, max_new_tokens=3) as tracer:
            with tracer.all():
                model.transformer.h[1].output[:, -1] += 2 * vector
            out = tracer.output.save()
    return (out.value,)


@pytest.mark.parametrize("scenario", [patching, attribution, steered, session_steering])
def test_remote_equals_local_bit_for_bit(alice, scenario):
    local = scenario(alice, remote=False)
    remote = scenario(alice, remote=True)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a, b)


def test_thin_client_needs_no_weights(fabric, gpt2, monkeypatch):
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the thin client loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    session = nnfabric.connect(fabric.url, fabric.keys["bob"], progress=False)
    thin = session.model("tiny-gpt2")
    assert thin._module is None
    assert thin.tree.render() == gpt2.tree.render()  # the same module tree, as print(model) shows it
    assert "runs on the fabric at" in repr(thin).splitlines()[0]
    assert thin.tokenizer(CLEAN)["input_ids"] == gpt2.tokenizer(CLEAN)["input_ids"]
    assert patching(thin, remote=True)[1].shape == (300,)
    with pytest.raises(nnfabric.InterventionError, match="remote=True"):
        with thin.trace(CLEAN):
            thin.lm_head.output.save()


def test_non_blocking_job_and_reattaching_from_another_process(alice, fabric, tmp_path):
    with alice.trace(CLEAN, remote=True, blocking=False) as tracer:
        hidden = alice.transformer.h[0].output.save()
        layers = [alice.transformer.h[i].output[0, -1].save() for i in range(2)]
    job = tracer.job
    assert job.status()["state"] in ("queued", "running", "completed")
    with pytest.raises(ValueError, match="wait"):
        _ = hidden.value
    assert job.wait(timeout=60) is job
    with alice.trace(CLEAN):
        expected = alice.transformer.h[0].output.save()
    assert torch.equal(hidden.value, expected.value)

    # Another process knows only the id and the key; values come back by their variable names.
    script = tmp_path / "reattach.py"
    script.write_text(
        "import sys, torch, nnfabric\n"
        "nnfabric.connect(sys.argv[1], sys.argv[2], progress=False)\n"
        "result = nnfabric.job(sys.argv[3]).result(timeout=60)\n"
        "torch.save({k: result[k] for k in ('hidden', 'layers')}, sys.argv[4])\n"
    )
    out = tmp_path / "values.pt"
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, str(script), fabric.url, fabric.keys["alice"], job.id, str(out)], check=True, timeout=120
    )
    values = torch.load(out)  # written by our own test process above
    assert torch.equal(values["hidden"], expected.value)
    assert len(values["layers"]) == 2 and torch.equal(values["layers"][1], layers[1].value)


def test_remote_errors_point_at_the_users_line(alice):
    with pytest.raises(nnfabric.RemoteError, match="IndexError") as info:
        with alice.trace(CLEAN, remote=True):
            alice.transformer.h[0].output[7].save()  # the remote bad line
    assert info.value.line is not None and "the remote bad line" in info.value.line.code


def headers(fabric, who="alice"):
    return {"Authorization": f"Bearer {fabric.keys[who]}"}


def body(model="tiny-gpt2", path="transformer.h.0", extra=None):
    graph = Graph()
    graph.invokes.append(Invoke(args=[CLEAN]))
    graph.add(Node("output", [path, 0, 0]))
    graph.saves.append(0)
    return pack_request(graph, {}, extra={"model": model, **(extra or {})})


def submit(fabric, who="alice", data=None):
    response = httpx.post(f"{fabric.url}/v1/jobs", content=data or body(), headers=headers(fabric, who))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_state(fabric, job_id, states=("completed", "failed", "cancelled"), timeout=60, who="alice"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{fabric.url}/v1/jobs/{job_id}", headers=headers(fabric, who)).json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck in {job['state']}")


def read_events(fabric, job_id, after="0-0", limit=None):
    seen = []
    url = fabric.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events?after={after}"
    with ws_connect(url, additional_headers=headers(fabric)) as ws:
        for message in ws:
            seen.append(json.loads(message))
            if limit and len(seen) >= limit:
                break
    return seen


def test_websocket_drop_and_resume_loses_nothing(fabric):
    job_id = submit(fabric)
    first = read_events(fabric, job_id, limit=1)
    assert first[0]["type"] == "queued" and "position" in first[0]
    rest = read_events(fabric, job_id, after=first[0]["id"])
    whole = read_events(fabric, job_id)
    assert [e["id"] for e in first + rest] == [e["id"] for e in whole]
    assert [e["type"] for e in whole] == ["queued", "running", "completed"]
    assert whole[-1]["result"] == f"/v1/jobs/{job_id}/result"


def test_small_results_ride_on_the_websocket_when_asked(fabric):
    job_id = submit(fabric)
    wait_state(fabric, job_id, ("completed",))
    fetched = httpx.get(f"{fabric.url}/v1/jobs/{job_id}/result", headers=headers(fabric)).content
    url = fabric.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events?after=0-0&result=inline"
    with ws_connect(url, additional_headers=headers(fabric)) as ws:
        frames = list(ws)
    *events, inline = frames
    assert [json.loads(e)["type"] for e in events] == ["queued", "running", "completed"]
    assert json.loads(events[-1])["inline"] is True
    assert isinstance(inline, bytes) and inline == fetched
    # Without the ask, the stream is events only (older clients fetch /result).
    assert [e["type"] for e in read_events(fabric, job_id)] == ["queued", "running", "completed"]
    session = FabricClient(fabric.url, fabric.keys["alice"], progress=False)
    assert session.wait(job_id)["inline"] is True and session.result(job_id) == fetched
    assert session.result(job_id) == fetched  # taken once; then fetched over HTTP


def test_users_are_isolated(fabric):
    job_id = submit(fabric, "alice")
    wait_state(fabric, job_id)
    for method, path in [("GET", ""), ("GET", "/result"), ("DELETE", "")]:
        response = httpx.request(method, f"{fabric.url}/v1/jobs/{job_id}{path}", headers=headers(fabric, "bob"))
        assert response.status_code == 404
    assert httpx.get(f"{fabric.url}/v1/jobs/{job_id}/result", headers=headers(fabric)).status_code == 200


def test_error_statuses(fabric):
    url = f"{fabric.url}/v1/jobs"
    assert httpx.post(url, content=body()).status_code == 401
    assert httpx.post(url, content=body(), headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(url, content=body(), headers=headers(fabric, "scoped")).status_code == 403
    missing = httpx.post(url, content=body(model="gpt-9"), headers=headers(fabric))
    assert missing.status_code == 404 and "gpt-9" in missing.json()["detail"]
    assert httpx.post(url, content=b"x" * 2_100_000, headers=headers(fabric)).status_code == 413
    bad = httpx.post(url, content=body(path="transformer.hh.0"), headers=headers(fabric))
    assert bad.status_code == 422 and "transformer.hh.0" in bad.json()["detail"] and bad.json()["node"] == 0
    assert httpx.post(url, content=b"garbage", headers=headers(fabric)).status_code == 422
    skew = httpx.post(url, content=body().replace(b"nnfabric.graph/1", b"nnfabric.graph/2"), headers=headers(fabric))
    assert skew.status_code == 422 and "upgrade" in skew.json()["detail"]
    not_ready = httpx.post(url, content=body(model="not-deployed"), headers=headers(fabric))
    assert not_ready.status_code == 503
    # A rate limit counts submissions only: reading and polling are never throttled.
    assert all(httpx.get(f"{fabric.url}/v1/models", headers=headers(fabric, "slow")).status_code == 200
               for _ in range(10))  # fmt: skip
    statuses = [httpx.post(url, content=body(), headers=headers(fabric, "slow")).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    limited = httpx.post(url, content=body(), headers=headers(fabric, "slow"))
    assert int(limited.headers["Retry-After"]) >= 1


def test_failed_job_reports_its_node_and_the_replica_survives(fabric, alice):
    graph = Graph()
    graph.invokes.append(Invoke(args=[CLEAN]))
    graph.add(Node("output", ["transformer.h.0", 0, 0]))
    graph.add(Node("call_method", ["view", Ref(0), 7, 13]))
    bad = submit(fabric, data=pack_request(graph, {}, extra={"model": "tiny-gpt2"}))
    job = wait_state(fabric, bad)
    assert job["state"] == "failed" and "RuntimeError" in job["error"] and job["error_node"] == 1
    local = patching(alice, remote=False)
    remote = patching(alice, remote=True)
    assert all(torch.equal(a, b) for a, b in zip(local, remote, strict=True))


def test_scheduler_killed_mid_queue_loses_no_job(fabric):
    job_ids = [submit(fabric, who) for who in ["alice", "bob"] * 4]
    fabric.kill_scheduler()
    queued_then_cancelled = submit(fabric)
    assert httpx.delete(f"{fabric.url}/v1/jobs/{queued_then_cancelled}", headers=headers(fabric)).status_code == 202
    more = [submit(fabric) for _ in range(3)]
    fabric.start_scheduler(name="scheduler-1")  # a new consumer: it must claim the dead one's entries
    for job_id, who in zip(job_ids, ["alice", "bob"] * 4, strict=True):
        assert wait_state(fabric, job_id, who=who)["state"] == "completed"
    for job_id in more:
        assert wait_state(fabric, job_id)["state"] == "completed"
    assert wait_state(fabric, queued_then_cancelled)["state"] == "cancelled"
    result = httpx.get(f"{fabric.url}/v1/jobs/{queued_then_cancelled}/result", headers=headers(fabric))
    assert result.status_code == 409


def test_models_catalog_structure_and_tokenizer(fabric, gpt2):
    models = httpx.get(f"{fabric.url}/v1/models", headers=headers(fabric)).json()
    by_name = {m["name"]: m for m in models}
    assert by_name["tiny-gpt2"]["state"] == "ready" and by_name["tiny-gpt2"]["replicas"] == 1
    assert by_name["not-deployed"]["state"] == "not started"
    tree = httpx.get(f"{fabric.url}/v1/models/tiny-gpt2/structure", headers=headers(fabric)).json()["tree"]
    assert set(tree["children"]) == {"transformer", "lm_head"}
    files = httpx.get(f"{fabric.url}/v1/models/tiny-gpt2/tokenizer", headers=headers(fabric)).json()["files"]
    assert "tokenizer.json" in files


def test_health_ready_and_metrics(fabric):
    assert httpx.get(f"{fabric.url}/healthz").json() == {"ok": True}
    ready = httpx.get(f"{fabric.url}/readyz").json()
    assert ready["ready"] and ready["checks"]["redis"] is True and ready["checks"]["ray"] is True
    submit(fabric)
    text = httpx.get(f"{fabric.url}/metrics").text
    assert 'nnfabric_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    assert 'nnfabric_queue_depth{model="tiny-gpt2"}' in text
    assert 'nnfabric_jobs_finished{state="completed"}' in text
    assert 'nnfabric_model_replicas_ready{model="tiny-gpt2"} 1.0' in text


def test_login_config_file_env_override_and_jobs_cli(fabric, alice, tmp_path, monkeypatch):
    from nnfabric import cli
    from nnfabric.cli import app
    from typer.testing import CliRunner

    monkeypatch.setattr(cli.console, "width", 200)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("NNFABRIC_URL", raising=False)
    monkeypatch.delenv("NNFABRIC_API_KEY", raising=False)
    runner = CliRunner()
    bad = runner.invoke(app, ["login", "--url", fabric.url, "--api-key", "nnf_wrong"])
    assert bad.exit_code == 1 and not (tmp_path / "nnfabric" / "config.toml").exists()
    done = runner.invoke(app, ["login", "--url", fabric.url, "--api-key", fabric.keys["bob"]])
    assert done.exit_code == 0, done.output
    config = tmp_path / "nnfabric" / "config.toml"
    assert config.stat().st_mode & 0o777 == 0o600
    assert nnfabric.connect().api_key == fabric.keys["bob"]  # from the file
    monkeypatch.setenv("NNFABRIC_API_KEY", fabric.keys["alice"])
    assert nnfabric.connect().api_key == fabric.keys["alice"]  # the environment wins

    with alice.trace(CLEAN, remote=True) as tracer:
        alice.lm_head.output.save()
    listed = runner.invoke(app, ["jobs", "list"])
    assert listed.exit_code == 0 and tracer.job.id in listed.output and "completed" in listed.output
    shown = runner.invoke(app, ["jobs", "show", tracer.job.id])
    assert json.loads(shown.output)["state"] == "completed"
    again = runner.invoke(app, ["jobs", "cancel", tracer.job.id])
    assert again.exit_code == 1 and "already completed" in again.output
    monkeypatch.setenv("NNFABRIC_API_KEY", fabric.keys["bob"])  # bob sees none of alice's jobs
    assert tracer.job.id not in runner.invoke(app, ["jobs", "list"]).output


def test_an_exact_job_runs_alone_while_its_batch_mates_share_a_pass(fabric, alice):
    # With the scheduler away, three jobs of one prompt width queue up and are read as one batch.
    fabric.kill_scheduler()
    try:
        jobs = []
        for exact in (False, True, False):
            with alice.trace(CLEAN, remote=True, blocking=False, exact=exact) as tracer:
                logits = alice.output.logits.save()
            jobs.append((tracer.job, logits))
    finally:
        fabric.start_scheduler()
    with alice.trace(CLEAN):
        expected = alice.output.logits.save()
    for job, logits in jobs:
        job.wait(timeout=120)
        assert torch.equal(logits.value, expected.value)
    shared = [read_events(fabric, job.id)[-1]["shared"] for job, _ in jobs]
    assert shared == [2, 1, 2], shared  # the exact job had a forward pass of its own
