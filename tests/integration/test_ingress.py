"""The api behind an ingress, NAT or proxy, on a real Redis: failed authentications throttle the
failing attempts only (a valid key on the same address is always served), X-Forwarded-For is
believed only from trusted proxies, keys travel in `Sec-WebSocket-Protocol` for browsers, and an
event stream closed by the client is free for the next one at once (real uvicorn, real sockets)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from services.api.app import create_app
from services.common.redis_server import free_port
from services.common.settings import Settings
from services.common.store import AUTH_FAILURES_PER_MINUTE, Store
from tests.support.keys import forget_failed_authentications


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def setup(redis_url, gpt2, tmp_path_factory) -> dict:
    folder: Path = tmp_path_factory.mktemp("ingress")
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": "x"}]}))

    async def prepare() -> dict:
        store = Store.from_url(redis_url)
        await store.set_model("tiny", state="ready", structure=json.dumps(gpt2.tree.to_json()))
        await store.replica_alive("tiny", "r1", ttl_s=3600)
        keys = {"alice": (await store.create_key("alice", ["*"]))[0],
                "one": (await store.create_key("olga", ["*"], max_streams=1))[0]}  # fmt: skip
        await store.close()
        return keys

    return {"catalog": str(catalog), "keys": _run(prepare()), "redis_url": redis_url}


def _settings(setup: dict, **more) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(redis_url=setup["redis_url"], catalog=setup["catalog"], **more)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}




def test_a_strangers_failed_guesses_never_lock_out_a_valid_key_on_the_same_address(setup):
    forget_failed_authentications(setup["redis_url"])
    key = setup["keys"]["alice"]
    with TestClient(create_app(_settings(setup)), client=("10.20.30.40", 5000)) as lab:
        guesses = [lab.get("/v1/models", headers=_bearer(f"nnf_guess{i}")).status_code
                   for i in range(AUTH_FAILURES_PER_MINUTE + 2)]  # fmt: skip
        assert guesses[:AUTH_FAILURES_PER_MINUTE] == [401] * AUTH_FAILURES_PER_MINUTE
        assert guesses[AUTH_FAILURES_PER_MINUTE:] == [429, 429]  # the failing attempts are throttled
        refused = lab.get("/v1/models", headers=_bearer("nnf_again"))
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert lab.get("/v1/models", headers=_bearer(key)).status_code == 200  # the lab's valid key: served
        with lab.websocket_connect("/v1/socket", headers=_bearer(key)) as ws:
            ws.send_text('{"cancel": "nobody"}')
            assert ws.receive_json()["type"] == "error"  # an answer: the socket was accepted
    forget_failed_authentications(setup["redis_url"])


def test_forwarded_addresses_are_believed_only_from_trusted_proxies(setup):
    forget_failed_authentications(setup["redis_url"])
    settings = _settings(setup, trusted_proxies="10.0.0.0/8")

    def guesses(client: TestClient, forwarded: str, n: int) -> list[int]:
        return [client.get("/v1/models", headers={**_bearer(f"nnf_g{i}"), "X-Forwarded-For": forwarded}).status_code
                for i in range(n)]  # fmt: skip

    with TestClient(create_app(settings), client=("10.0.0.7", 5000)) as ingress:
        # Through the trusted ingress, each client's failures are its own.
        assert guesses(ingress, "203.0.113.5", AUTH_FAILURES_PER_MINUTE + 1)[-1] == 429
        assert guesses(ingress, "203.0.113.6", 1) == [401]  # another client behind the same ingress
    with TestClient(create_app(settings), client=("198.51.100.9", 5000)) as direct:
        # An untrusted peer cannot pick whom its failures count against by writing the header.
        spread = [direct.get("/v1/models", headers={**_bearer("nnf_x"), "X-Forwarded-For": f"203.0.113.{i}"}).status_code
                  for i in range(AUTH_FAILURES_PER_MINUTE + 1)]  # fmt: skip
        assert spread[-1] == 429
    with TestClient(create_app(_settings(setup)), client=("10.0.0.7", 5000)) as untrusting:
        # With no trusted proxies the header is ignored: the ingress address has used up its failures.
        assert guesses(untrusting, "203.0.113.99", 1) == [401]  # 10.0.0.7 itself had none yet...
        assert guesses(untrusting, "203.0.113.98", AUTH_FAILURES_PER_MINUTE)[-1] == 429  # ...now it has
    forget_failed_authentications(setup["redis_url"])


def test_a_browser_sends_its_key_as_a_websocket_subprotocol(setup):
    key = setup["keys"]["alice"]
    with TestClient(create_app(_settings(setup))) as client:
        with client.websocket_connect("/v1/socket", subprotocols=["bearer", key]) as ws:
            assert ws.accepted_subprotocol == "bearer"
            ws.send_text('{"cancel": "nobody"}')
            assert ws.receive_json()["type"] == "error"
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/v1/socket", subprotocols=["bearer", "nnf_wrong"]) as ws:
                ws.receive_json()
        assert refused.value.code == 4401


@pytest.fixture(scope="module")
def live_api(setup) -> Iterator[str]:
    """The api under uvicorn on a loopback port, as it runs for real."""
    port = free_port()
    config = uvicorn.Config(create_app(_settings(setup, stream_slot_wait_s=1.0)), host="127.0.0.1", port=port,
                            log_level="warning", proxy_headers=False)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the api did not start"
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _submit(live_api: str, key: str) -> str:
    from nnfabric.graph import Graph, Invoke, Node
    from nnfabric.runtime.wire import pack_request

    graph = Graph()
    graph.invokes.append(Invoke(args=["The Eiffel Tower is in"]))
    graph.saves.append(graph.add(Node("output", ["transformer.h.0", 0, 0])).id)
    body = pack_request(graph, {}, extra={"model": "tiny"})
    reply = httpx.post(f"http://{live_api}/v1/jobs", content=body, headers=_bearer(key), timeout=30)
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    return job_id


def test_a_stream_closed_by_the_client_is_free_for_the_next_at_once(setup, live_api):
    key = setup["keys"]["one"]  # max_streams=1
    job_id = _submit(live_api, key)
    url = f"ws://{live_api}/v1/jobs/{job_id}/events"
    for attempt in range(20):
        with connect(url, additional_headers=_bearer(key), open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "queued", attempt
        # closed by the client: the very next stream must be let in
    # Browsers: the key as a subprotocol, over a real handshake.
    with connect(url, subprotocols=["bearer", key], open_timeout=30) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bearer" and json.loads(ws.recv(timeout=30))["type"] == "queued"
    # While one stream is open, a second is refused with a code and reason the client can read.
    with connect(url, additional_headers=_bearer(key), open_timeout=30) as held:
        assert json.loads(held.recv(timeout=30))["type"] == "queued"
        with connect(url, additional_headers=_bearer(key), open_timeout=30) as second:
            with pytest.raises(ConnectionClosed) as refused:
                second.recv(timeout=30)
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 4429
        assert "1 event streams open" in refused.value.rcvd.reason


def test_a_stream_the_server_ends_is_free_before_the_client_hears_the_close(setup, live_api):
    key = setup["keys"]["one"]
    for attempt in range(10):
        job_id = _submit(live_api, key)
        cancelled = httpx.delete(f"http://{live_api}/v1/jobs/{job_id}", headers=_bearer(key), timeout=30)
        assert cancelled.status_code == 202
        with connect(f"ws://{live_api}/v1/jobs/{job_id}/events", additional_headers=_bearer(key),
                     open_timeout=30) as ws:  # fmt: skip
            types = []
            with pytest.raises(ConnectionClosed) as ended:
                while True:
                    types.append(json.loads(ws.recv(timeout=30))["type"])
            assert types[-1] == "cancelled" and ended.value.rcvd is not None and ended.value.rcvd.code == 1000
            # The slot was given back before the close frame left the server.
            assert _streams_open(setup["redis_url"], key) == 0, attempt


def _streams_open(redis_url: str, key: str) -> int:
    async def read() -> int:
        store = Store.from_url(redis_url)
        try:
            record = await store.lookup_key(key)
            assert record is not None
            return await store.streams_open(record)
        finally:
            await store.close()

    return _run(read())
