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


def _recent(user: str) -> str:
    return f"nnf:recent:{user}"


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


def _job_record(raw: dict[str, str]) -> dict[str, Any] | None:
    if not raw:
        return None
    job: dict[str, Any] = dict(raw)
    for name in ("created", "started", "finished"):
        if name in job:
            job[name] = float(job[name])
    job["bytes"] = int(job.get("bytes", 0))
    job["meta"] = json.loads(job.get("meta", "{}"))
    return job


# Scripts run atomically inside Redis: a state and its event are written together in one round
# trip, and a terminal state cannot be overwritten by a racing writer (cancel vs. complete).
# (The model's queue key and the outcome counter are named inside; this is a single Redis, not a cluster.)
_SUBMIT = """
local job, payload, queued, events, stream, recent, mine = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, user, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('SET', payload, ARGV[5], 'EX', ttl)
redis.call('HSET', job, unpack(ARGV, 6))
redis.call('EXPIRE', job, ttl)
redis.call('ZADD', queued, now, id)
local position = redis.call('ZRANK', queued, id)
redis.call('XADD', events, '*', 'type', 'queued', 'data', '{"position": ' .. position .. '}')
redis.call('EXPIRE', events, ttl)
redis.call('XADD', stream, '*', 'job', id, 'user', user)
for _, list in ipairs({recent, mine}) do
  redis.call('LPUSH', list, id)
  redis.call('LTRIM', list, 0, 199)
end
return position
"""

_TRANSITION = """
local job, events, payload, result = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, state, terminal, data, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local current = redis.call('HGET', job, 'state')
if not current or current == 'completed' or current == 'failed' or current == 'cancelled' then
  return false
end
if ARGV[6] == '1' then redis.call('SET', result, ARGV[7], 'EX', ttl) end
redis.call('HSET', job, unpack(ARGV, 8))
if terminal == '1' then
  local model = redis.call('HGET', job, 'model')
  if model then redis.call('ZREM', 'nnf:queued:' .. model, id) end
  redis.call('DEL', payload)
  redis.call('HINCRBY', 'nnf:outcomes', state, 1)
end
local event = redis.call('XADD', events, '*', 'type', state, 'data', data)
redis.call('EXPIRE', events, ttl)
return event
"""


class Store:
    def __init__(self, redis: Redis, ttl_s: int = 86400) -> None:
        # redis-py's stubs type replies as unions of every wire type; we decode them ourselves.
        self.redis: Any = redis
        self.ttl_s = ttl_s
        self._submit = redis.register_script(_SUBMIT)  # sent by digest (EVALSHA) after the first call
        self._transition = redis.register_script(_TRANSITION)

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

    async def authorize(self, key: str, window_s: int = 60) -> tuple[ApiKey | None, int]:
        """Look the key up and count one request against its rate limit, in one round trip.
        Returns (the key's record or None, 0 if allowed else seconds until the window resets)."""
        digest = hash_key(key)
        now = time.time()
        window = int(now // window_s)
        counter = f"nnf:rate:{digest[:12]}:{window}"  # digest[:12] is the key id
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"nnf:key:{digest}")
            pipe.incr(counter)
            pipe.expire(counter, window_s * 2)
            raw, count, _ = await pipe.execute()
        record = _api_key(_decode_hash(raw))
        if record is not None and count > record.rate_limit:
            return record, max(1, int((window + 1) * window_s - now))
        return record, 0

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, job_id: str, user: str, model: str, payload: bytes, meta: dict[str, Any]) -> int:
        """Store the payload and job, announce `queued`, then enqueue (one atomic script).
        Returns the queue position."""
        now = time.time()
        record = {"id": job_id, "user": user, "model": model, "state": "queued", "created": str(now),
                  "bytes": str(len(payload)), "meta": json.dumps(meta)}  # fmt: skip
        fields = [item for pair in record.items() for item in pair]
        keys = [_job(job_id), _payload(job_id), _queued(model), _events(job_id), queue_stream(model),
                "nnf:recent", _recent(user)]  # fmt: skip
        position = await self._submit(keys, [job_id, user, now, self.ttl_s, payload, *fields])
        return int(position)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        job = _job_record(_decode_hash(await self.redis.hgetall(_job(job_id))))
        return None if job is None else (await self._with_positions([job]))[0]

    async def _with_positions(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add each queued job's current queue position (one pipelined round trip)."""
        queued = [job for job in jobs if job["state"] == "queued"]
        if queued:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in queued:
                    pipe.zrank(_queued(job["model"]), job["id"])
                ranks = await pipe.execute()
            for job, rank in zip(queued, ranks, strict=True):
                job["position"] = None if rank is None else int(rank)
        return jobs

    async def transition(
        self, job_id: str, state: str, data: dict[str, Any] | None = None, result: bytes | None = None, **fields: Any
    ) -> bool:
        """Persist a new state (and the result, if given), then announce it: one atomic script.
        Terminal states are final: returns False, storing nothing, if the job had already ended
        (or does not exist)."""
        stamp = {"running": "started"}.get(state, "finished" if state in TERMINAL else "")
        mapping: dict[str, Any] = {"state": state, **{k: v for k, v in fields.items() if v is not None}}
        if stamp:
            mapping[stamp] = time.time()
        flat = [_text(item) for pair in mapping.items() for item in pair]
        keys = [_job(job_id), _events(job_id), _payload(job_id), _result(job_id)]
        args: list[str | int | bytes] = [job_id, state, int(state in TERMINAL), json.dumps(data or {}), self.ttl_s]
        event_id = await self._transition(keys, [*args, int(result is not None), result or b"", *flat])
        return event_id is not None

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

    async def payloads(self, job_ids: list[str]) -> list[bytes | None]:
        """The jobs' envelopes, in order (None where one has expired): one round trip."""
        data: list[bytes | None] = await self.redis.mget([_payload(j) for j in job_ids]) if job_ids else []
        return data

    async def states(self, job_ids: list[str]) -> list[tuple[str, float] | None]:
        """(state, created) of each job, in order (None where there is no such job): one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(_job(job_id), "state", "created")
            replies = await pipe.execute()
        return [None if state is None else (_text(state), float(created or 0)) for state, created in replies]

    async def result(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(_result(job_id))
        return data

    async def dequeued(self, model: str, job_ids: list[str]) -> None:
        """The jobs left the queue for a replica: they no longer count in others' positions."""
        if job_ids:
            await self.redis.zrem(_queued(model), *job_ids)

    async def queue_depth(self, model: str) -> tuple[int, float | None]:
        """(jobs waiting, seconds the oldest has waited)."""
        depth = await self.redis.zcard(_queued(model))
        oldest = await self.redis.zrange(_queued(model), 0, 0, withscores=True)
        wait = time.time() - float(oldest[0][1]) if oldest else None
        return int(depth), wait

    async def recent_jobs(self, limit: int = 20, user: str | None = None) -> list[dict[str, Any]]:
        """The newest jobs, of everyone or of one user (each list keeps the last 200)."""
        ids = await self.redis.lrange(_recent(user) if user else "nnf:recent", 0, limit - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(_job(_text(job_id)))
            records = await pipe.execute()
        jobs = [job for job in (_job_record(_decode_hash(raw)) for raw in records) if job is not None]
        return await self._with_positions(jobs)

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

    async def model(self, name: str, *fields: str) -> dict[str, str]:
        """A model's published state; only the named fields if given (the tokenizer can be megabytes)."""
        if not fields:
            return _decode_hash(await self.redis.hgetall(_model(name)))
        values = await self.redis.hmget(_model(name), list(fields))
        return {f: _text(v) for f, v in zip(fields, values, strict=True) if v is not None}
