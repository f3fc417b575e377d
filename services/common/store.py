"""Everything the fabric keeps in Redis: API keys, jobs, their events, payloads, results, queues.

Usage::

    store = Store(redis.asyncio.from_url(url), ttl_s=86400)
    key, record = await store.create_key("alice", models=["gpt2"], rate_limit=60)
    await store.submit(job_id, user="alice", model="gpt2", payload=data)
    async for event_id, event in store.follow(job_id, after="0-0"): ...

Every state change is written to the job's hash before its event is announced, in one
transaction, so a reader that sees an event always finds the state it describes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

TERMINAL = frozenset({"completed", "failed", "cancelled"})
GROUP = "schedulers"


def _job(job_id: str) -> str:
    return f"nnf:job:{job_id}"


def _events(job_id: str) -> str:
    return f"nnf:events:{job_id}"


def _payload(job_id: str) -> str:
    return f"nnf:payload:{job_id}"


def _result(job_id: str) -> str:
    return f"nnf:result:{job_id}"


def queue_stream(model: str) -> str:
    return f"nnf:queue:{model}"


def _queued(model: str) -> str:
    return f"nnf:queued:{model}"


def _model(model: str) -> str:
    return f"nnf:model:{model}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKey:
    key_id: str
    user: str
    models: list[str]
    rate_limit: int
    created: float

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _api_key(raw: dict[str, str]) -> ApiKey | None:
    if not raw:
        return None
    return ApiKey(raw["key_id"], raw["user"], json.loads(raw["models"]), int(raw["rate_limit"]), float(raw["created"]))


class Store:
    def __init__(self, redis: Redis, ttl_s: int = 86400) -> None:
        # redis-py's stubs type replies as unions of every wire type; we decode them ourselves.
        self.redis: Any = redis
        self.ttl_s = ttl_s

    # -- API keys --------------------------------------------------------------------------
    async def create_key(self, user: str, models: list[str], rate_limit: int = 60) -> tuple[str, ApiKey]:
        """Make a key; only its hash is stored. Returns (the key, shown once; its record)."""
        key = "nnf_" + secrets.token_urlsafe(24)
        digest = hash_key(key)
        record = ApiKey(digest[:12], user, models, rate_limit, time.time())
        await self.redis.hset(
            f"nnf:key:{digest}",
            mapping={"key_id": record.key_id, "user": user, "models": json.dumps(models),
                     "rate_limit": rate_limit, "created": record.created},
        )  # fmt: skip
        await self.redis.hset("nnf:key_ids", record.key_id, digest)
        return key, record

    async def lookup_key(self, key: str) -> ApiKey | None:
        return _api_key(_decode_hash(await self.redis.hgetall(f"nnf:key:{hash_key(key)}")))

    async def list_keys(self) -> list[ApiKey]:
        found = []
        for digest in (await self.redis.hgetall("nnf:key_ids")).values():
            record = _api_key(_decode_hash(await self.redis.hgetall(f"nnf:key:{_text(digest)}")))
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda k: k.created)

    async def revoke_key(self, key_id: str) -> bool:
        digest = await self.redis.hget("nnf:key_ids", key_id)
        if digest is None:
            return False
        await self.redis.delete(f"nnf:key:{_text(digest)}")
        await self.redis.hdel("nnf:key_ids", key_id)
        return True

    async def rate_limited(self, key: ApiKey, window_s: int = 60) -> int:
        """Count one request; return 0 if allowed, else seconds until the window resets."""
        now = time.time()
        window = int(now // window_s)
        counter = f"nnf:rate:{key.key_id}:{window}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, window_s * 2)
            count, _ = await pipe.execute()
        if count > key.rate_limit:
            return max(1, int((window + 1) * window_s - now))
        return 0

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, job_id: str, user: str, model: str, payload: bytes, meta: dict[str, Any]) -> int:
        """Store the payload and job, announce `queued`, then enqueue. Returns the queue position."""
        now = time.time()
        record = {"id": job_id, "user": user, "model": model, "state": "queued", "created": now,
                  "bytes": len(payload), "meta": json.dumps(meta)}  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(_payload(job_id), payload, ex=self.ttl_s)
            pipe.hset(_job(job_id), mapping=record)
            pipe.expire(_job(job_id), self.ttl_s)
            pipe.zadd(_queued(model), {job_id: now})
            pipe.zrank(_queued(model), job_id)
            results = await pipe.execute()
        position = int(results[-1] or 0)
        await self._event(job_id, "queued", {"position": position})
        await self.redis.xadd(queue_stream(model), {"job": job_id, "user": user})
        return position

    async def job(self, job_id: str) -> dict[str, Any] | None:
        raw = _decode_hash(await self.redis.hgetall(_job(job_id)))
        if not raw:
            return None
        job: dict[str, Any] = dict(raw)
        for name in ("created", "started", "finished"):
            if name in job:
                job[name] = float(job[name])
        job["bytes"] = int(job.get("bytes", 0))
        job["meta"] = json.loads(job.get("meta", "{}"))
        if job["state"] == "queued":
            rank = await self.redis.zrank(_queued(job["model"]), job_id)
            job["position"] = None if rank is None else int(rank)
        return job

    async def transition(self, job_id: str, state: str, data: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Persist a new state, then announce it. Terminal states are final: returns False if already ended."""
        current = await self.redis.hget(_job(job_id), "state")
        if current is None or _text(current) in TERMINAL:
            return False
        stamp = {"running": "started"}.get(state, "finished" if state in TERMINAL else None)
        mapping: dict[str, Any] = {"state": state, **{k: v for k, v in fields.items() if v is not None}}
        if stamp:
            mapping[stamp] = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_job(job_id), mapping=mapping)
            if state in TERMINAL:
                model = await self.redis.hget(_job(job_id), "model")
                if model is not None:
                    pipe.zrem(_queued(_text(model)), job_id)
                pipe.delete(_payload(job_id))
                pipe.hincrby("nnf:outcomes", state, 1)
            await pipe.execute()
        await self._event(job_id, state, data or {})
        return True

    async def log(self, job_id: str, message: str) -> None:
        await self._event(job_id, "log", {"message": message})

    async def _event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        event_id = await self.redis.xadd(_events(job_id), {"type": kind, "data": json.dumps(data)})
        await self.redis.expire(_events(job_id), self.ttl_s)
        return _text(event_id)

    async def events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after `after`, waiting up to block_ms for the first one."""
        reply = await self.redis.xread({_events(job_id): after}, count=100, block=block_ms)
        found = []
        for _stream, entries in reply or []:
            for event_id, fields in entries:
                raw = _decode_hash(fields)
                found.append((_text(event_id), {"type": raw["type"], **json.loads(raw["data"])}))
        return found

    async def payload(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(_payload(job_id))
        return data

    async def put_result(self, job_id: str, data: bytes) -> None:
        await self.redis.set(_result(job_id), data, ex=self.ttl_s)

    async def result(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(_result(job_id))
        return data

    async def dequeued(self, model: str, job_id: str) -> None:
        await self.redis.zrem(_queued(model), job_id)

    async def queue_depth(self, model: str) -> tuple[int, float | None]:
        """(jobs waiting, seconds the oldest has waited)."""
        depth = await self.redis.zcard(_queued(model))
        oldest = await self.redis.zrange(_queued(model), 0, 0, withscores=True)
        wait = time.time() - float(oldest[0][1]) if oldest else None
        return int(depth), wait

    async def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        ids = await self.redis.lrange("nnf:recent", 0, limit - 1)
        jobs = [await self.job(_text(i)) for i in ids]
        return [j for j in jobs if j is not None]

    async def remember(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush("nnf:recent", job_id)
            pipe.ltrim("nnf:recent", 0, 199)
            await pipe.execute()

    async def outcomes(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode_hash(await self.redis.hgetall("nnf:outcomes")).items()}

    async def heartbeat(self, component: str, ttl_s: int = 10) -> None:
        await self.redis.set(f"nnf:heartbeat:{component}", time.time(), ex=ttl_s)

    async def alive(self, prefix: str) -> list[str]:
        return [_text(k).removeprefix("nnf:heartbeat:") async for k in self.redis.scan_iter(f"nnf:heartbeat:{prefix}*")]

    # -- models ----------------------------------------------------------------------------
    async def set_model(self, name: str, **fields: Any) -> None:
        values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        values["updated"] = time.time()
        await self.redis.hset(_model(name), mapping=values)

    async def model(self, name: str) -> dict[str, str]:
        return _decode_hash(await self.redis.hgetall(_model(name)))
