"""The job store's state machine against a real Redis: read back with plain Redis commands."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis

from services.common.store import Store
from tests.support.oracles import key_of


def run(coro):
    return asyncio.run(coro)


async def _events(redis: Redis, job_id: str) -> list[tuple[str, dict]]:
    entries = await redis.xrange(f"nnf:events:{job_id}")
    return [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in entries]


def test_submit_persists_announces_and_enqueues_in_order(redis_url):
    async def scenario():
        redis = Redis.from_url(redis_url)
        store = Store(redis, ttl_s=600)
        first = await store.submit("j1", key_of("alice"), "m", b"payload-1", {"kind": "trace"})
        second = await store.submit("j2", key_of("bob"), "m", b"payload-2", {"kind": "trace"})
        assert (first, second) == (0, 1)
        assert await redis.get("nnf:payload:j2") == b"payload-2"
        assert 0 < await redis.ttl("nnf:payload:j2") <= 600
        record = await redis.hgetall("nnf:job:j2")
        assert record[b"state"] == b"queued" and record[b"user"] == b"bob"
        assert json.loads(record[b"meta"]) == {"kind": "trace"}
        assert await _events(redis, "j2") == [("queued", {"position": 1})]
        queued = await redis.xrange("nnf:queue:m")
        assert [(f[b"job"], f[b"user"]) for _, f in queued] == [(b"j1", b"alice"), (b"j2", b"bob")]
        assert [j["id"] for j in await store.recent_jobs(10)] == ["j2", "j1"]
        assert [j["id"] for j in await store.recent_jobs(10, user="alice")] == ["j1"]
        job = await store.job("j2")
        assert job is not None and job["position"] == 1 and isinstance(job["created"], float)
        await redis.aclose()

    run(scenario())


def test_terminal_states_are_final_and_clean_up(redis_url):
    async def scenario():
        redis = Redis.from_url(redis_url)
        store = Store(redis, ttl_s=600)
        await store.submit("k1", key_of("alice"), "n", b"p", {})
        assert await store.transition("k1", "running", {"batch": 1})
        assert (await redis.hget("nnf:job:k1", "started")) is not None
        assert await store.transition("k1", "completed", {"bytes": 3}, result=b"res", error=None)
        assert await redis.get("nnf:result:k1") == b"res" and 0 < await redis.ttl("nnf:result:k1") <= 600
        # A cancel racing the completion loses, and announces nothing.
        assert not await store.transition("k1", "cancelled", {"by": "user"})
        assert not await store.transition("missing", "running")
        assert await redis.hget("nnf:job:k1", "state") == b"completed"
        assert await redis.exists("nnf:payload:k1") == 0
        assert await redis.zscore("nnf:queued:n", "k1") is None
        assert [t for t, _ in await _events(redis, "k1")] == ["queued", "running", "completed"]
        assert int(await redis.hget("nnf:outcomes", "completed")) >= 1
        await redis.aclose()

    run(scenario())


def test_rate_limit_counts_submissions_and_failed_keys_are_throttled_per_address(redis_url):
    async def scenario():
        redis = Redis.from_url(redis_url)
        store = Store(redis)
        key, record = await store.create_key("carol", ["m"], rate_limit=2)
        found, wait = await store.authorize(key, "10.0.0.1")
        assert found is not None and found.key_id == record.key_id and wait == 0
        assert [await store.count_submit(found) for _ in range(3)][:2] == [0, 0]
        assert 1 <= await store.count_submit(found) <= 60
        unlimited, _ = await store.create_key("erin", ["m"])
        erin = (await store.authorize(unlimited, "10.0.0.1"))[0]
        assert [await store.count_submit(erin) for _ in range(100)] == [0] * 100  # no limit by default
        # Guessing keys: after 30 failures a minute the address's failing attempts wait; a good key
        # from the same address (a lab behind one NAT) is still let through.
        for _ in range(30):
            assert await store.authorize("nnf_guess", "10.0.0.9") == (None, 0)
        refused, wait = await store.authorize("nnf_guess", "10.0.0.9")
        assert refused is None and 1 <= wait <= 60
        assert (await store.authorize(key, "10.0.0.9")) == (found, 0)
        assert (await store.authorize("nnf_guess", "10.0.0.1")) == (None, 0)  # other addresses are unaffected
        await redis.aclose()

    run(scenario())


def test_active_jobs_are_capped_per_key_and_freed_when_they_end(redis_url):
    async def scenario():
        redis = Redis.from_url(redis_url)
        store = Store(redis)
        await redis.flushdb()
        _, record = await store.create_key("frank", ["m"], max_active=2)
        assert await store.submit("a1", record, "m", b"p", {}) == 0
        assert await store.submit("a2", record, "m", b"p", {}) == 1
        assert await store.submit("a3", record, "m", b"p", {}) is None
        assert await redis.exists("nnf:job:a3") == 0  # nothing of a refused job is stored
        assert await store.transition("a1", "completed", result=b"r")
        assert await store.submit("a3", record, "m", b"p", {}) is not None
        await redis.delete("nnf:job:a2")  # expired without ending: its slot is freed too
        assert await store.submit("a4", record, "m", b"p", {}) is not None
        await redis.aclose()

    run(scenario())


def test_a_cancelled_job_gets_no_result_and_batches_read_in_one_go(redis_url):
    async def scenario():
        redis = Redis.from_url(redis_url)
        store = Store(redis, ttl_s=600)
        for job_id in ("b1", "b2", "b3"):
            await store.submit(job_id, key_of("dave"), "q", job_id.encode(), {})
        assert await store.payloads(["b1", "nope", "b3"]) == [b"b1", None, b"b3"]
        assert await store.transition("b2", "cancelled", {"by": "user"})
        states = await store.states(["b1", "b2", "nope"])
        assert states[0] is not None and states[0][0] == "queued" and states[0][1] > 0
        assert states[1] is not None and states[1][0] == "cancelled" and states[2] is None
        # The replica finishing a job cancelled meanwhile stores nothing and announces nothing.
        assert not await store.transition("b2", "completed", {"bytes": 3}, result=b"late")
        assert await redis.exists("nnf:result:b2") == 0
        assert [t for t, _ in await _events(redis, "b2")] == ["queued", "cancelled"]
        await store.dequeued("q", ["b1", "b3"])
        assert await redis.zrange("nnf:queued:q", 0, -1) == []
        await redis.aclose()

    run(scenario())
