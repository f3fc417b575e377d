"""The gateway's routes with FastAPI's TestClient on a real Redis, without Ray: every status code
a caller can meet, in milliseconds. A model is "published" the way a replica publishes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from nnfabric.graph import Graph, Invoke, Node, Ref, SourceLine
from nnfabric.runtime.wire import pack_request
from starlette.websockets import WebSocketDisconnect

from services.api.app import create_app
from services.common.settings import Settings
from services.common.store import Store
from tests.support.keys import forget_failed_authentications, new_key

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def api(redis_url, gpt2, tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("routes")
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [
        {"name": "tiny", "source": "x", "limits": {"max_nodes": 50, "max_tensor_bytes": 1000}},
        {"name": "cold", "source": "y"},
    ]}))  # fmt: skip

    async def setup() -> dict[str, str]:
        store = Store.from_url(redis_url)
        await store.redis.flushdb()
        await store.set_model("tiny", state="ready", structure=json.dumps(gpt2.tree.to_json()))
        await store.replica_alive("tiny", "r1", ttl_s=3600)
        keys = {
            "alice": (await store.create_key("alice", ["*"]))[0],
            "bob": (await store.create_key("bob", ["*"]))[0],
            "scoped": (await store.create_key("carol", ["other"]))[0],
            "slow": (await store.create_key("dave", ["*"], rate_limit=2))[0],
        }
        await store.close()
        return keys

    keys = asyncio.run(setup())
    settings = Settings(redis_url=redis_url, catalog=str(catalog), max_envelope_bytes=200_000, stream_slot_wait_s=0.5)
    with TestClient(create_app(settings)) as client:
        client.keys = keys  # type: ignore[attr-defined]
        yield client


def auth(api, who="alice"):
    return {"Authorization": f"Bearer {api.keys[who]}"}


def envelope(model="tiny", path="transformer.h.0", nodes=1, tensors=None):
    graph = Graph()
    graph.invokes.append(Invoke(args=[PROMPT]))
    graph.add(Node("output", [path, 0, 0], line=SourceLine("study.py", 7, "h = model.x.output")))
    for _ in range(nodes - 1):
        graph.add(Node("getattr", [Ref(0), "shape"]))
    graph.saves.append(0)
    return pack_request(graph, tensors or {}, extra={"model": model})


def post(api, body, who="alice"):
    return api.post("/v1/jobs", content=body, headers={**auth(api, who), "Content-Type": "application/octet-stream"})


def test_authentication_and_scopes(api):
    assert api.post("/v1/jobs", content=envelope()).status_code == 401
    assert api.post("/v1/jobs", content=envelope(), headers={"Authorization": "Bearer nope"}).status_code == 401
    assert post(api, envelope(), "scoped").status_code == 403
    missing = post(api, envelope(model="gpt-9"))
    assert missing.status_code == 404 and "gpt-9" in missing.json()["detail"]
    cold = post(api, envelope(model="cold"))
    assert cold.status_code == 503 and cold.headers["Retry-After"]


def test_invalid_requests_are_422_with_the_node_and_line(api):
    bad = post(api, envelope(path="transformer.hh.0"))
    body = bad.json()
    assert bad.status_code == 422 and "transformer.hh.0" in body["detail"] and body["node"] == 0
    assert body["line"] == {"file": "study.py", "line": 7, "code": "h = model.x.output"}
    assert post(api, b"garbage").status_code == 422
    skew = post(api, envelope().replace(b"nnfabric.graph/1", b"nnfabric.graph/2"))
    assert skew.status_code == 422 and "upgrade" in skew.json()["detail"]


def test_limits_are_413(api):
    too_many = post(api, envelope(nodes=51))
    assert too_many.status_code == 413 and "50" in too_many.json()["detail"]
    import torch

    heavy = post(api, envelope(tensors={"t0": torch.zeros(1000)}))
    assert heavy.status_code == 413 and "1000" in heavy.json()["detail"]
    assert post(api, b"x" * 200_001).status_code == 413

    def chunks():  # no Content-Length: the body is cut as it streams in
        for _ in range(30):
            yield b"x" * 10_000

    streamed = api.post("/v1/jobs", content=chunks(), headers=auth(api))
    assert streamed.status_code == 413


def test_submit_read_cancel_and_other_users(api):
    reply = post(api, envelope())
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert job["state"] == "queued" and job["model"] == "tiny" and isinstance(job["position"], int)
    record = api.get(f"/v1/jobs/{job['id']}", headers=auth(api)).json()
    assert record["state"] == "queued" and record["user"] == "alice" and record["meta"]["nodes"] == 1
    assert job["id"] in [j["id"] for j in api.get("/v1/jobs", headers=auth(api)).json()]
    for method, path in [("GET", ""), ("GET", "/result"), ("DELETE", "")]:
        assert api.request(method, f"/v1/jobs/{job['id']}{path}", headers=auth(api, "bob")).status_code == 404
    assert job["id"] not in [j["id"] for j in api.get("/v1/jobs", headers=auth(api, "bob")).json()]
    early = api.get(f"/v1/jobs/{job['id']}/result", headers=auth(api))
    assert early.status_code == 409 and early.json()["state"] == "queued"
    assert api.delete(f"/v1/jobs/{job['id']}", headers=auth(api)).json() == {"id": job["id"], "state": "cancelled"}
    assert api.delete(f"/v1/jobs/{job['id']}", headers=auth(api)).status_code == 409
    assert api.get("/v1/jobs?limit=0", headers=auth(api)).status_code == 422
    assert api.get(f"/v1/jobs/{'x' * 5000}", headers=auth(api)).status_code == 404


def test_events_websocket(api):
    job_id = post(api, envelope()).json()["id"]
    api.delete(f"/v1/jobs/{job_id}", headers=auth(api))
    with api.websocket_connect(f"/v1/jobs/{job_id}/events", headers=auth(api)) as ws:
        events = [ws.receive_json(), ws.receive_json()]
    assert [e["type"] for e in events] == ["queued", "cancelled"] and events[1]["by"] == "user"
    with api.websocket_connect(f"/v1/jobs/{job_id}/events?after={events[0]['id']}", headers=auth(api)) as ws:
        assert ws.receive_json()["id"] == events[1]["id"]  # resumes after the given event
    for query, code in [("?after=garbage", 4400), ("", 4404)]:
        with pytest.raises(WebSocketDisconnect) as closed:
            who = "alice" if query else "bob"
            with api.websocket_connect(f"/v1/jobs/{job_id}/events{query}", headers=auth(api, who)) as ws:
                ws.receive_json()
        assert closed.value.code == code


def test_rate_limit_counts_submissions_only(api):
    assert all(api.get("/v1/models", headers=auth(api, "slow")).status_code == 200 for _ in range(10))
    statuses = [post(api, envelope(), "slow").status_code for _ in range(3)]
    assert statuses == [202, 202, 429]


def test_active_jobs_and_streams_are_capped_per_key(api, redis_url):
    api.keys["capped"] = new_key(redis_url, "gina", max_active=2, max_streams=1)
    ids = [post(api, envelope(), "capped") for _ in range(3)]
    assert [r.status_code for r in ids] == [202, 202, 429] and "2 jobs" in ids[2].json()["detail"]
    first = ids[0].json()["id"]
    with api.websocket_connect(f"/v1/jobs/{first}/events", headers=auth(api, "capped")) as ws:
        assert ws.receive_json()["type"] == "queued"
        with pytest.raises(WebSocketDisconnect) as refused:
            with api.websocket_connect(f"/v1/jobs/{first}/events", headers=auth(api, "capped")) as second:
                second.receive_json()
        assert refused.value.code == 4429
    second = ids[1].json()["id"]
    with api.websocket_connect(f"/v1/jobs/{second}/events", headers=auth(api, "capped")) as ws:
        assert ws.receive_json()["type"] == "queued"  # the first stream's slot was given back
    api.delete(f"/v1/jobs/{first}", headers=auth(api, "capped"))
    assert post(api, envelope(), "capped").status_code == 202  # a job slot freed when the job ended


def test_jobs_refused_by_the_cap_do_not_spend_the_rate_limit(api, redis_url):
    api.keys["hana"] = new_key(redis_url, "hana", max_active=2, rate_limit=5)
    held = [post(api, envelope(), "hana") for _ in range(2)]
    assert [r.status_code for r in held] == [202, 202]
    refused = [post(api, envelope(), "hana") for _ in range(6)]  # the cap refuses all six
    assert {r.status_code for r in refused} == {429} and all("2 jobs" in r.json()["detail"] for r in refused)
    unread = post(api, b"not an envelope", "hana")  # refused before it is read: no validation work
    assert unread.status_code == 429 and "2 jobs" in unread.json()["detail"]
    with api.websocket_connect("/v1/socket", headers=auth(api, "hana")) as ws:
        for _ in range(4):  # the same on the job socket
            ws.send_bytes(envelope())
            reply = ws.receive_json()
            assert reply["type"] == "rejected" and reply["status"] == 429 and "2 jobs" in reply["detail"]
    for r in held:
        api.delete(f"/v1/jobs/{r.json()['id']}", headers=auth(api, "hana"))
    # 2 counted so far, not 12: three more fit in the minute's five, and the sixth is rate limited.
    later = [post(api, envelope(), "hana") for _ in range(2)]
    assert [r.status_code for r in later] == [202, 202]
    api.delete(f"/v1/jobs/{later[0].json()['id']}", headers=auth(api, "hana"))
    fifth = post(api, envelope(), "hana")
    assert fifth.status_code == 202
    api.delete(f"/v1/jobs/{fifth.json()['id']}", headers=auth(api, "hana"))  # room under the cap again
    over = post(api, envelope(), "hana")
    assert over.status_code == 429 and "rate limit" in over.json()["detail"]


def test_failed_authentication_is_throttled_per_address(api, redis_url):
    forget_failed_authentications(redis_url)  # every test here comes from one address
    try:
        statuses = [api.get("/v1/models", headers={"Authorization": f"Bearer nnf_guess{i}"}).status_code
                    for i in range(31)]  # fmt: skip
        assert statuses[:30] == [401] * 30 and statuses[30] == 429
        assert api.get("/v1/models", headers={"Authorization": "Bearer nnf_more"}).status_code == 429
        assert api.get("/v1/models", headers=auth(api)).status_code == 200  # a valid key is never locked out
    finally:
        forget_failed_authentications(redis_url)


def test_models_health_and_public_status(api, redis_url):
    models = {m["name"]: m for m in api.get("/v1/models", headers=auth(api)).json()}
    assert models["tiny"]["state"] == "ready" and models["tiny"]["replicas"] == 1
    assert models["cold"]["state"] == "not started" and models["cold"]["replicas"] == 0
    assert api.get("/v1/models/tiny/structure", headers=auth(api)).json()["tree"]["type"] == "GPT2LMHeadModel"
    assert api.get("/v1/models/cold/structure", headers=auth(api)).status_code == 503
    assert api.get("/healthz").json() == {"ok": True}
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["ray"] == "no scheduler connected to Ray"
    status = api.get("/status.json").json()
    assert status["jobs"]["recent"] >= 1 and "alice" not in json.dumps(status)

    async def replica_gone() -> None:
        store = Store.from_url(redis_url)
        await store.replica_gone("tiny", "r1")
        await store.close()

    async def scheduler_alive() -> None:
        store = Store.from_url(redis_url)
        await store.heartbeat("scheduler:test", 30)
        await store.close()

    asyncio.run(scheduler_alive())
    assert api.get("/readyz").status_code == 200  # Redis, a scheduler, and a model with a live replica
    asyncio.run(replica_gone())
    tiny = api.get("/v1/models/tiny", headers=auth(api)).json()
    assert tiny["state"] == "unavailable" and tiny["replicas"] == 0 and "jobs wait" in tiny["error"]
    ready = api.get("/readyz")
    assert ready.status_code == 503 and "no model has a live replica" in ready.json()["checks"]["jobs"]


def test_openapi_declares_the_records_and_error_shapes(api):
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"JobRecord", "SubmitReply", "ModelInfo", "ErrorBody", "JobEvent"} - set(schemas) <= {"JobEvent"}
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert submit["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("SubmitReply")
    assert submit["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    assert "application/octet-stream" in submit["requestBody"]["content"]
    job = spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert job["$ref"].endswith("JobRecord")
    schema = spec["paths"]["/v1/schema"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("SchemaDocument") and "ops" in schemas["SchemaDocument"]["properties"]
    # Every JSON answer of every route declares its shape.
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                declared = answer.get("content", {}).get("application/json", {"schema": {"$ref": "n/a"}})["schema"]
                assert declared, (method, path, code)
    assert api.get("/v1/schema").json()["ops"]["call_method"]["names"]


HOSTILE_BATCHES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'{"jobs": 5}',
    b'{"jobs": {"0": {}}}',
    b'{"jobs": [5, "x", null, [], true]}',
    b'{"jobs": [{}]}',
    b'{"jobs": [{"model": "tiny"}]}',
    b'{"jobs": [{"model": "tiny", "graph": "x"}]}',
    b'{"jobs": [{"model": 1e999, "graph": {"nodes": NaN}}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"jobs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"\xff\xfe\x00{",
    b'{"jobs": [], "jobs": 3}',
]


@pytest.mark.parametrize("body", HOSTILE_BATCHES, ids=range(len(HOSTILE_BATCHES)))
def test_a_hostile_batch_earns_a_clear_refusal_never_a_500(api, body):
    reply = api.post("/v1/jobs/batch", content=body, headers={**auth(api), "Content-Type": "application/json"})
    assert reply.status_code < 500, (reply.status_code, reply.text[:300])
    answer = reply.json()
    if reply.status_code >= 400:
        assert isinstance(answer["detail"], str) and answer["detail"]
        return
    # Accepted as a batch: every job is an item, refused on its own with a reason.
    assert all(item.get("status", 202) < 500 for item in answer["jobs"])
    assert all("id" in item or item["detail"] for item in answer["jobs"])
