"""HTTP callers without Python: jobs and results in JSON, the published schema, OpenAPI.

The oracle for the JSON form is the binary form the Python client sends: the same job in JSON
must give the same result bytes, the same errors, and the same tensors.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from nnfabric.graph.json_form import DTYPE_CODES, job_json_from_envelope
from nnfabric.remote.http import FabricClient
from nnfabric.runtime.wire import unpack_values
from websockets.sync.client import connect as ws_connect

from services.api.routes_schema import published_schema

ROOT = Path(__file__).resolve().parents[2]
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


def patching(model):
    with model.trace(remote=True) as tracer:
        with tracer.invoke(CLEAN):
            clean = model.transformer.h[-1].output[:, -1].save()
        with tracer.invoke(CORRUPT):
            model.transformer.h[-1].output[:, -1] = clean
            model.output.logits[0, -1].save()


def attribution(model):
    paris = model.tokenizer(" Paris")["input_ids"][0]
    with model.trace(CLEAN, remote=True):
        h = model.transformer.h[0].output
        model.output.logits[0, -1, paris].backward()
        (h.grad * h).sum(-1).save()


def steering(model):
    with model.generate(CLEAN, max_new_tokens=4, remote=True) as tracer:
        with tracer.all():
            model.transformer.h[0].output[:, -1] += torch.ones(64)
        tracer.output.save()


@pytest.fixture
def captured(alice, monkeypatch):
    """The binary envelopes the Python client submits, and the job ids they got."""
    sent: list[tuple[bytes, str]] = []
    original = FabricClient.submit

    def submit(self, body):
        reply = original(self, body)
        sent.append((body, reply["id"]))
        return reply

    monkeypatch.setattr(FabricClient, "submit", submit)
    return sent


def auth(fabric):
    return {"Authorization": f"Bearer {fabric.keys['alice']}"}


def wait_done(fabric, job_id):
    url = fabric.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events"
    with ws_connect(url, additional_headers=auth(fabric)) as ws:
        for message in ws:
            event = json.loads(message)
            if event["type"] in ("completed", "failed", "cancelled"):
                return event
    raise AssertionError("no final event")


def tensor_from_json(value):
    dtype = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
             "bool": np.bool_, "float16": np.float16}[value["dtype"]]  # fmt: skip
    array = np.frombuffer(base64.b64decode(value["data"]), dtype=dtype).reshape(value["shape"])
    return torch.from_numpy(array.copy())


@pytest.mark.parametrize("scenario", [patching, attribution, steering])
def test_a_json_job_gives_the_same_result_as_the_binary_one(fabric, alice, captured, scenario):
    scenario(alice)
    ((binary, binary_id),) = captured
    body = job_json_from_envelope(binary)
    assert isinstance(json.dumps(body), str)  # plain JSON, nothing binary left
    reply = httpx.post(f"{fabric.url}/v1/jobs", json=body, headers=auth(fabric))
    assert reply.status_code == 202, reply.text
    assert wait_done(fabric, reply.json()["id"])["type"] == "completed"
    results = [httpx.get(f"{fabric.url}/v1/jobs/{j}/result", headers=auth(fabric)).content
               for j in (binary_id, reply.json()["id"])]  # fmt: skip
    assert results[0] == results[1]
    # The result as JSON decodes to the very tensors of the binary one.
    as_json = httpx.get(f"{fabric.url}/v1/jobs/{binary_id}/result",
                        headers={**auth(fabric), "Accept": "application/json"}).json()  # fmt: skip
    binary_values = unpack_values(results[0])
    assert set(as_json["values"]) == set(binary_values)
    for key, value in binary_values.items():
        assert torch.equal(tensor_from_json(as_json["values"][key]), value)


def test_json_errors_carry_the_same_node_and_line(fabric, alice, captured):
    import nnfabric

    with pytest.raises(nnfabric.RemoteError):
        with alice.trace(CLEAN, remote=True):
            alice.transformer.h[0].output.view(5, 5).save()  # wrong on the fabric
    ((binary, _),) = captured
    body = job_json_from_envelope(binary)
    body["graph"]["nodes"][0]["args"][0] = "transformer.hh.0"  # now the gateway refuses it
    binary_reply = httpx.post(f"{fabric.url}/v1/jobs", content=_envelope(body), headers=auth(fabric))
    json_reply = httpx.post(f"{fabric.url}/v1/jobs", json=body, headers=auth(fabric))
    assert binary_reply.status_code == json_reply.status_code == 422
    a, b = binary_reply.json(), json_reply.json()
    assert a == b and a["node"] == 0 and "wrong on the fabric" in a["line"]["code"]


def _envelope(body):
    from nnfabric.graph.json_form import envelope_from_json
    from nnfabric.graph.validate import Limits

    return envelope_from_json(json.dumps(body).encode(), Limits())


@pytest.mark.parametrize(
    "broken, words",
    [
        ({"tensors": {"t0": {"dtype": "float32", "shape": [3], "data": "AAAA"}}}, "bytes of data"),
        ({"tensors": {"t0": {"dtype": "complex64", "shape": [1], "data": ""}}}, "dtype"),
        ({"tensors": {"t0": {"dtype": "float32", "shape": [1], "data": "!!!!"}}}, "base64"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_malformed_json_jobs_are_422_with_a_reason(fabric, broken, words):
    body = {"model": "tiny-gpt2", "graph": {"kind": "trace", "nodes": [], "invokes": [{"args": [CLEAN]}]}, **broken}
    reply = httpx.post(f"{fabric.url}/v1/jobs", json=body, headers=auth(fabric))
    assert reply.status_code == 422 and words in reply.json()["detail"]


def test_the_result_can_ride_the_websocket_as_json(fabric):
    body = {"model": "tiny-gpt2", "graph": {"kind": "trace", "invokes": [{"args": [CLEAN]}], "saves": [0],
            "nodes": [{"op": "output", "args": ["transformer.h.0", 0, 0]}]}}  # fmt: skip
    job_id = httpx.post(f"{fabric.url}/v1/jobs", json=body, headers=auth(fabric)).json()["id"]
    url = fabric.url.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events?result=json"
    with ws_connect(url, additional_headers=auth(fabric)) as ws:
        frames = [json.loads(m) for m in ws]
    assert [f["type"] for f in frames][-2:] == ["completed", "result"]
    output = frames[-1]["values"]["0"]
    assert output["dtype"] == "float32" and output["shape"][0] == 1 and output["shape"][2] == 64


def test_the_published_schema_validates_real_graphs_and_matches_the_docs(fabric, alice, captured):
    for scenario in (patching, attribution, steering):
        scenario(alice)
    schema = httpx.get(f"{fabric.url}/v1/schema").json()
    assert schema == json.loads(json.dumps(published_schema()))
    validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/JobJSON"})
    for binary, _ in captured:
        body = job_json_from_envelope(binary)
        validator.validate(body)  # every graph the client writes fits the published schema
    assert not validator.is_valid({"model": "x", "graph": {"kind": "exec", "nodes": [], "invokes": [{}]}})
    assert schema["ops"]["call_method"]["names"] and set(DTYPE_CODES) == set(
        schema["$defs"]["Tensor"]["properties"]["dtype"]["enum"]
    )
    written = json.loads((ROOT / "docs" / "schema.json").read_text())
    assert written == json.loads(json.dumps(published_schema())), "run: python -m services.api.routes_schema"


def test_openapi_describes_both_bodies_and_the_json_result(fabric):
    spec = httpx.get(f"{fabric.url}/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/octet-stream", "application/json"}
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/JobJSON"
    for name in ("JobJSON", "ResultJSON", "Graph", "Node", "Tensor", "Value", "ErrorBody", "JobRecord"):
        assert name in spec["components"]["schemas"], name
    result = spec["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert set(result) == {"application/octet-stream", "application/json"}


def test_the_node_example_runs_the_lifecycle_and_gets_the_right_values(fabric, gpt2):
    import os
    import re
    import shutil
    import subprocess

    node = shutil.which("node")
    assert node, "the HTTP example needs Node.js (18 or later)"
    flags = []
    probe = subprocess.run([node, "--experimental-websocket", "-e", "0"], capture_output=True)
    if probe.returncode == 0:
        flags.append("--experimental-websocket")  # Node 20-21 keep WebSocket behind it
    env = {**os.environ, "NNFABRIC_URL": fabric.url, "NNFABRIC_API_KEY": fabric.keys["alice"],
           "NNFABRIC_MODEL": "tiny-gpt2"}  # fmt: skip
    run = subprocess.run([node, *flags, str(ROOT / "examples" / "http" / "patch_and_save.mjs")],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "event completed" in run.stdout
    shown = [float(v) for v in re.search(r"first values (\S+)", run.stdout).group(1).split(",")]
    # The oracle: the same edit as a hand-written hook on the local model.
    ids = torch.tensor([gpt2.tokenizer(CLEAN)["input_ids"]])
    seen = []

    def zero_last(module, args, output):
        output[:, -1] = 0
        return output

    edit = gpt2._module.transformer.h[0].register_forward_hook(zero_last)
    keep = gpt2._module.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            gpt2._module(ids)
    finally:
        keep.remove()
        edit.remove()
    assert seen[0].shape == (1, ids.shape[1], 64)
    assert all(abs(a - b) < 6e-5 for a, b in zip(shown, seen[0][0, 0, :3].tolist(), strict=True)), shown
    assert f"answer: transformer.h.1 output has shape [1,{ids.shape[1]},64]" in run.stdout
