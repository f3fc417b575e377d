"""Operators' key commands (`nnfabric-server keys`) against a real Redis."""

import re

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.common.redis_server import RedisServer


@pytest.fixture
def redis_url(monkeypatch):
    server = RedisServer.start()
    monkeypatch.setenv("NNFABRIC_REDIS_URL", server.url)
    yield server.url
    server.stop()


def test_keys_create_list_revoke(redis_url):
    import asyncio

    from redis.asyncio import Redis

    from services.common.store import Store

    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "alice", "--models", "gpt2,llama", "--rate-limit", "5"])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    key_id = re.search(r"key id (\w+)", created.output).group(1)

    async def lookup():
        store = Store(Redis.from_url(redis_url))
        found = await store.lookup_key(key)
        raw = await store.redis.keys("nnf:key:*")
        await store.redis.aclose()
        return found, raw

    found, raw = asyncio.run(lookup())
    assert found.user == "alice" and found.models == ["gpt2", "llama"] and found.rate_limit == 5
    assert all(key.encode() not in k for k in raw)  # stored only as a hash
    listed = runner.invoke(app, ["keys", "list"])
    assert key_id in listed.output and "alice" in listed.output
    assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 0
    assert asyncio.run(lookup())[0] is None
    assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 1


