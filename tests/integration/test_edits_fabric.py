"""Persistent edits on the fabric: one user's own, equal to the local edit, registered on first
remote use, listed and removed through the api and the CLI; hostile edit lists and bodies are
refused with a reason, never a 500."""

from __future__ import annotations

import httpx
import nnfabric
import pytest
import torch
from nnfabric.errors import RemoteError
from nnfabric.runtime.wire import pack_job

from tests.unit.test_edits import hooked

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Alice went to the market"


def test_a_remote_edit_is_its_users_own_and_equals_the_local_one(gpt2, fabric):
    alice_fabric = nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False)
    thin = alice_fabric.model("tiny-gpt2")
    direction = torch.randn(64, generator=torch.Generator().manual_seed(8))
    with thin.edit() as steered:  # a thin client registers the edit at once
        thin.transformer.h[1].output[:, -1] += direction
    (record,) = [e for e in alice_fabric.edits("tiny-gpt2") if e["id"] in steered.edits[0].registered.values()]
    assert record["nodes"] >= 2 and any("direction" in line for line in record["lines"])
    with steered.trace(PROMPT, remote=True):
        remote = steered.output.logits.save()
    with gpt2.edit() as local_steered:
        gpt2.transformer.h[1].output[:, -1] += direction
    with local_steered.trace(PROMPT):
        local = local_steered.output.logits.save()
    assert torch.equal(remote.value, local.value)

    # Bob sees none of it, cannot name it, and his jobs run on the plain model.
    bob = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['bob']}"})
    assert bob.get("/v1/models/tiny-gpt2/edits").json() == []
    assert bob.delete(f"/v1/models/tiny-gpt2/edits/{record['id']}").status_code == 404
    with gpt2.trace(PROMPT) as tracer:
        gpt2.output.logits.save()
    body = pack_job([tracer.recording.graph], {}, False, {"model": "tiny-gpt2", "edits": [record["id"]]})
    refused = bob.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
    assert refused.status_code == 422 and "no edit" in refused.json()["detail"]
    bob_fabric = nnfabric.Fabric(fabric.url, fabric.keys["bob"], progress=False)
    bob_thin = bob_fabric.model("tiny-gpt2")
    with bob_thin.trace(PROMPT, remote=True):
        bobs = bob_thin.output.logits.save()
    with gpt2.trace(PROMPT):
        plain = gpt2.output.logits.save()
    assert torch.equal(bobs.value, plain.value)

    # Removing it: gone from the list, and a job naming it is refused with the reason.
    edit_id = record["id"]
    steered.clear_edits()
    assert edit_id not in [e["id"] for e in alice_fabric.edits("tiny-gpt2")]
    alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
    body = pack_job([tracer.recording.graph], {}, False, {"model": "tiny-gpt2", "edits": [edit_id]})
    gone = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
    assert gone.status_code == 422 and "GET /v1/models/tiny-gpt2/edits" in gone.json()["detail"]


def test_a_local_model_registers_its_edit_on_first_remote_use(alice, gpt2):
    with alice.edit() as ablated:
        alice.transformer.h[0].mlp.output[:] = 0
    assert ablated.edits[0].registered == {}
    with ablated.trace(PROMPT, remote=True):
        remote = ablated.output.logits.save()
    assert len(ablated.edits[0].registered) == 1
    assert torch.equal(remote.value, hooked(gpt2, PROMPT, gpt2._module.transformer.h[0].mlp, lambda o: o * 0))
    ablated.clear_edits()


def test_the_api_refuses_edits_that_save_take_inputs_or_clash(fabric, gpt2):
    with gpt2.trace(PROMPT) as tracer:
        gpt2.transformer.h[0].mlp.output[:] = 0
    # An edit with inputs (a trace's invoke) is refused.
    with_inputs = _post_edit(fabric, pack_job([tracer.recording.graph], tracer.recording.tensors, False, {"model": "tiny-gpt2"}))
    assert with_inputs.status_code == 422 and "no inputs" in with_inputs.json()["detail"]
    with gpt2.edit() as edited:
        gpt2.transformer.h[0].mlp.output[:] = torch.ones(64)
    graph = edited.edits[0].graph
    graph.saves = [0]
    saving = _post_edit(fabric, pack_job([graph], edited.edits[0].tensors, False, {"model": "tiny-gpt2"}))
    assert saving.status_code == 422 and "keeps no values" in saving.json()["detail"]
    graph.saves = []
    ok = _post_edit(fabric, pack_job([graph], edited.edits[0].tensors, False, {"model": "tiny-gpt2"}))
    assert ok.status_code == 201, ok.text
    # A job whose own tensor is named as the merged edit's would be: refused, not confused.
    with gpt2.trace(PROMPT) as job:
        gpt2.transformer.h[1].output[:] = torch.zeros(64)
    tensors = {"edit0_" + name: t for name, t in job.recording.tensors.items()}
    for node in job.recording.graph.nodes:
        node.args = [type(a)("edit0_" + a.name) if type(a).__name__ == "TensorRef" else a for a in node.args]
    alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
    body = pack_job([job.recording.graph], tensors, False, {"model": "tiny-gpt2", "edits": [ok.json()["id"]]})
    clash = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
    assert clash.status_code == 422 and "named twice" in clash.json()["detail"]
    assert alice.delete(f"/v1/models/tiny-gpt2/edits/{ok.json()['id']}").status_code == 204


def test_the_number_of_edits_a_user_keeps_is_capped(fabric, gpt2):
    from services.api.routes_edits import MAX_EDITS_PER_MODEL

    with gpt2.edit() as edited:
        gpt2.transformer.h[0].mlp.output[:] = 0
    body = pack_job([edited.edits[0].graph], {}, False, {"model": "tiny-gpt2"})
    ids = []
    try:
        for _ in range(MAX_EDITS_PER_MODEL):
            reply = _post_edit(fabric, body)
            if reply.status_code == 409:
                break
            assert reply.status_code == 201
            ids.append(reply.json()["id"])
        over = _post_edit(fabric, body)
        assert over.status_code == 409 and "remove one first" in over.json()["detail"]
    finally:
        alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
        for edit_id in ids:
            alice.delete(f"/v1/models/tiny-gpt2/edits/{edit_id}")


def test_remote_errors_name_a_missing_edit_clearly(fabric):
    thin = nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False).model("tiny-gpt2")
    with thin.edit() as edited:
        thin.transformer.h[0].mlp.output[:] = 0
    edit = edited.edits[0]
    ((_where, edit_id),) = edit.registered.items()
    httpx.delete(
        f"{fabric.url}/v1/models/tiny-gpt2/edits/{edit_id}", headers={"Authorization": f"Bearer {fabric.keys['alice']}"}
    )
    with pytest.raises(RemoteError, match="no edit"):
        with edited.trace(PROMPT, remote=True):
            edited.output.logits.save()


def test_the_cli_lists_and_removes_your_edits(fabric):
    from nnfabric.cli import app
    from typer.testing import CliRunner

    thin = nnfabric.connect(fabric.url, fabric.keys["alice"], progress=False).model("tiny-gpt2")
    with thin.edit() as edited:
        thin.transformer.h[0].mlp.output[:] = 0  # zero the first MLP
    ((_, edit_id),) = edited.edits[0].registered.items()
    env = {"NNFABRIC_URL": fabric.url, "NNFABRIC_API_KEY": fabric.keys["alice"], "COLUMNS": "200"}
    runner = CliRunner()
    listed = runner.invoke(app, ["edits", "list", "tiny-gpt2"], env=env)
    assert listed.exit_code == 0 and edit_id in listed.output and "zero the first MLP" in listed.output
    removed = runner.invoke(app, ["edits", "rm", "tiny-gpt2", edit_id], env=env)
    assert removed.exit_code == 0
    again = runner.invoke(app, ["edits", "rm", "tiny-gpt2", edit_id], env=env)
    assert again.exit_code == 1 and "no edit" in again.output


@pytest.mark.parametrize("edits", ["edit_x", 7, None, {"a": 1}, [1, 2], ["x" * 10_000], ["e"] * 17, [["nested"]]])
def test_hostile_edit_lists_in_a_job_are_refused_with_a_reason_never_a_500(fabric, gpt2, edits):
    with gpt2.trace(PROMPT) as tracer:
        gpt2.output.logits.save()
    body = pack_job([tracer.recording.graph], {}, False, {"model": "tiny-gpt2", "edits": edits})
    alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
    reply = alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 422 and reply.json()["detail"], reply.text


@pytest.mark.parametrize("body", [b"", b"NNFB", b"garbage" * 100, b'{"model": "tiny-gpt2"}'])
def test_hostile_edit_bodies_are_refused_with_a_reason_never_a_500(fabric, body):
    reply = _post_edit(fabric, body)
    assert 400 <= reply.status_code < 500 and reply.json()["detail"], reply.text


def _post_edit(fabric, body):  # type: ignore[no-untyped-def]
    alice = httpx.Client(base_url=fabric.url, headers={"Authorization": f"Bearer {fabric.keys['alice']}"})
    return alice.post("/v1/models/tiny-gpt2/edits", content=body, headers={"Content-Type": "application/octet-stream"})
