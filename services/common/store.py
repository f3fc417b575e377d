"""Everything the fabric keeps in Redis: API keys, jobs, their events, payloads, results, the
per-model queues (streams with a consumer group) and the models' published state.

Usage::

    store = Store(redis.asyncio.from_url(url), ttl_s=86400)
    key, record = await store.create_key("alice", models=["gpt2"], max_active=64)
    await store.submit(job_id, user="alice", model="gpt2", payload=data, meta={})
    events = await store.events(job_id, after="0-0", block_ms=1000)

This is the only module that names a Redis key or calls Redis: the api, the scheduler and the
replicas go through these methods. Every state change is written to the job's hash before its
event is announced, in one script, so a reader that sees an event always finds the state it
describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from nnfabric.protocol import TERMINAL, EditRecord, JobEvent, JobMeta, JobRecord
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("nnfabric.store")

GROUP = "schedulers"
_QUEUE_PREFIX = "nnf:queue:"


def _job(job_id: str) -> str:
    return f"nnf:job:{job_id}"


def _events(job_id: str) -> str:
    return f"nnf:events:{job_id}"


def _batch(batch_id: str) -> str:
    return f"nnf:batch:{batch_id}"


def _waker(name: str) -> str:
    return f"nnf:waker:{name}"


def _payload(job_id: str) -> str:
    return f"nnf:payload:{job_id}"


def _result(job_id: str) -> str:
    return f"nnf:result:{job_id}"


def _queue(model: str) -> str:
    return _QUEUE_PREFIX + model


def _queued(model: str) -> str:
    return f"nnf:queued:{model}"


def _recent(user: str) -> str:
    return f"nnf:recent:{user}"


def _model(model: str) -> str:
    return f"nnf:model:{model}"


def _replica(model: str, replica: str) -> str:
    return f"nnf:replica:{model}:{replica}"


def _replicas(model: str) -> str:
    return f"nnf:replicas:{model}"


def _key(digest: str) -> str:
    return f"nnf:key:{digest}"


def _active(key_id: str) -> str:
    return f"nnf:active:{key_id}"


def _edits(user: str, model: str) -> str:
    return f"nnf:edits:{user}:{model}"


def _edit_payloads(user: str, model: str) -> str:
    return f"nnf:edit_payloads:{user}:{model}"


def _stats(model: str) -> str:
    return f"nnf:stats:{model}"


def _timings(model: str) -> str:
    return f"nnf:timings:{model}"


def _history(model: str) -> str:
    return f"nnf:history:{model}"


def _history_state(model: str) -> str:
    return f"nnf:history_state:{model}"


_KEY_IDS = "nnf:key_ids"
_HEARTBEAT = "nnf:heartbeat:"
_RECENT = "nnf:recent"
_OUTCOMES = "nnf:outcomes"
_HISTORY_TURN = "nnf:history_turn"
# Each model's (wait, run) of its last jobs to end, for the history's percentiles: a stream
# trimmed to about this many entries, so a flood of jobs between two samples costs bounded memory
# (the percentiles are then over the newest of them).
TIMINGS_KEPT = 10_000


@dataclass(frozen=True)
class QueueEntry:
    """A job waiting in a model's stream, as a scheduler read it."""

    model: str
    stream_id: str
    job_id: str
    user: str


@dataclass(frozen=True)
class ModelStats:
    """A model's counts since Redis was created (every api and scheduler adds to the same ones)."""

    finished: int  # jobs that ended, in any final state
    batches: int  # batches the schedulers sent to its replicas
    batch_jobs: int  # jobs in those batches


@dataclass(frozen=True)
class ModelReading:
    """A model's counters at one instant of Redis's clock (the history's sampler turns two
    readings into rates)."""

    at: float
    stats: ModelStats
    queue_depth: int
    replicas: int
    timings: list[tuple[float, float]]  # (wait, run) of the jobs that ended after the cursor
    cursor: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Per-key defaults. Concurrency caps keep one user from crowding out the rest; a rate limit
# (submissions a minute) is off unless an operator sets one, so an honest loop of small
# sequential traces runs at full speed.
MAX_ACTIVE = 64  # jobs queued or running at once
MAX_STREAMS = 16  # event websockets open at once
AUTH_FAILURES_PER_MINUTE = 30  # per client address; then 429 until the minute ends


@dataclass
class ApiKey:
    key_id: str
    user: str
    models: list[str]
    rate_limit: int  # job submissions a minute; 0: no limit
    created: float
    max_active: int = MAX_ACTIVE
    max_streams: int = MAX_STREAMS

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _api_key(raw: dict[str, str]) -> ApiKey | None:
    if not raw:
        return None
    return ApiKey(
        raw["key_id"], raw["user"], json.loads(raw["models"]), int(raw["rate_limit"]), float(raw["created"]),
        int(raw.get("max_active", MAX_ACTIVE)), int(raw.get("max_streams", MAX_STREAMS)),
    )  # fmt: skip


def _job_record(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "state" not in raw:
        return None
    job: dict[str, Any] = {k: v for k, v in raw.items() if v not in ("", "None")}
    for name in ("created", "started", "finished"):
        if name in job:
            job[name] = float(job[name])
    for name in ("error_node", "error_trace", "attempts"):
        if name in job:
            job[name] = int(job[name])
    job.pop("result_file", None)  # where the api finds a large result: not the caller's business
    job.pop("runner", None)  # which dispatch ran it: the fabric's bookkeeping
    job["bytes"] = int(job.get("bytes", 0))
    job["meta"] = cast(JobMeta, json.loads(job.get("meta", "{}")))
    return cast(JobRecord, job)


# Scripts run atomically inside Redis: a state and its event are written together in one round
# trip, and a terminal state cannot be overwritten by a racing writer (cancel vs. complete).
# (The model's queue key and the outcome counter are named inside; this is a single Redis, not a cluster.)
# Whether the key has `cap` jobs that have not ended (`active`, a set of ids: a job's end
# removes it). Only when it looks full are ids whose record ended or expired unseen dropped, so
# a submission reads one set's size, not every job's state. Needs locals active, job_prefix, cap.
_FULL = """
local full = redis.call('SCARD', active) >= cap
if full then
  for _, other in ipairs(redis.call('SMEMBERS', active)) do
    local state = redis.call('HGET', job_prefix .. other, 'state')
    if not state or state == 'completed' or state == 'failed' or state == 'cancelled' then
      redis.call('SREM', active, other)
    end
  end
  full = redis.call('SCARD', active) >= cap
end
"""
_SUBMIT = """
local job, payload, queued, events, stream, recent, mine = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local active = KEYS[8]
local id, user, now, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local cap, job_prefix = tonumber(ARGV[6]), ARGV[7]
""" + _FULL + """
if full then return -1 end
redis.call('SADD', active, id)
redis.call('EXPIRE', active, ttl)
redis.call('SET', payload, ARGV[5], 'EX', ttl)
redis.call('HSET', job, unpack(ARGV, 8))
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
local runner = ARGV[9]
local current = redis.call('HGET', job, 'state')
-- The same change by the same runner, already made (a retry after a reply lost to an outage).
if runner ~= '' and current == state and redis.call('HGET', job, 'runner') == runner then return 'again' end
if not current or current == 'completed' or current == 'failed' or current == 'cancelled' then
  return false
end
-- A job starts once: a second dispatch of it (a scheduler took over) finds it started.
if state == 'running' and current ~= 'queued' then return false end
if ARGV[6] == '1' then redis.call('SET', result, ARGV[7], 'EX', ttl) end
redis.call('HSET', job, unpack(ARGV, 11))
if state == 'running' then redis.call('HINCRBY', job, 'attempts', 1) end
if terminal == '1' then
  local model = redis.call('HGET', job, 'model')
  if model then
    redis.call('ZREM', ARGV[8] .. model, id)
    -- The status page's history: jobs ended per model, and each started job's wait and run.
    redis.call('HINCRBY', KEYS[7] .. model, 'finished', 1)
    local times = redis.call('HMGET', job, 'created', 'started', 'finished')
    local created, started, finished = tonumber(times[1]), tonumber(times[2]), tonumber(times[3])
    if created and started and finished then
      -- Capped by length here; its TTL (a model gone from the catalog) is renewed by the sampler.
      redis.call('XADD', KEYS[8] .. model, 'MAXLEN', '~', ARGV[10], '*',
                 'w', tostring(started - created), 'r', tostring(finished - started))
    end
  end
  local key = redis.call('HGET', job, 'key')
  if key then redis.call('SREM', KEYS[6] .. key, id) end
  redis.call('DEL', payload)
  redis.call('HINCRBY', KEYS[5], state, 1)
end
local event = redis.call('XADD', events, '*', 'type', state, 'data', data)
redis.call('EXPIRE', events, ttl)
return event
"""


# A job goes back to the queue (its replica was lost): unless it has ended meanwhile.
_REQUEUE = """
local job, events, queued = KEYS[1], KEYS[2], KEYS[3]
local id, data, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local current = redis.call('HGET', job, 'state')
if not current or current == 'completed' or current == 'failed' or current == 'cancelled' then
  return false
end
redis.call('HSET', job, 'state', 'queued')
redis.call('ZADD', queued, redis.call('HGET', job, 'created'), id)
local position = redis.call('ZRANK', queued, id)
local event = redis.call('XADD', events, '*', 'type', 'queued',
                         'data', '{"retry": true, "position": ' .. position .. ', "reason": ' .. data .. '}')
redis.call('EXPIRE', events, ttl)
return event
"""

# A key's submissions in the last window, as a sorted set scored by the server's clock (one
# clock for every api replica). Returns 0 when the jobs are counted, else seconds to wait.
_RATE = """
local window, limit, jobs, member = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if limit <= 0 then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count + jobs > limit then
  if jobs > limit then return window end
  local oldest = redis.call('ZRANGE', KEYS[1], count + jobs - limit - 1, count + jobs - limit - 1, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(oldest[2]) + window - now))
end
for i = 1, jobs do redis.call('ZADD', KEYS[1], now, member .. ':' .. i) end
redis.call('EXPIRE', KEYS[1], window + 1)
return 0
"""

# A job's admission, before it is read: refused (-1, not counted) while the key has its
# `max_active` jobs queued or running, else counted against the rate limit as _RATE does.
_ADMIT = """
local active, job_prefix, cap = KEYS[2], ARGV[5], tonumber(ARGV[6])
""" + _FULL + """
if full then return -1 end
""" + _RATE

# A key's open event streams: taken only below its cap (no transient over-count that would
# refuse a concurrent opener), given back never below zero.
_TAKE_STREAM = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 3600)  -- a crashed api's counts fade
return 1
"""
_GIVE_STREAM = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"""


@dataclass
class Transition:
    """One job's change of state, for `Store.transition_many`."""

    job_id: str
    state: str
    data: dict[str, Any] | None = None
    result: bytes | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    # Who makes the change (a replica's dispatch): a retry of a change whose first try went
    # through but whose reply was lost (Redis died meanwhile) is recognised and reports success
    # without writing or announcing anything twice.
    runner: str = ""
    # When it happened (a change recorded late, after an outage, keeps the time it was made).
    at: float = field(default_factory=time.time)


class Store:
    def __init__(self, redis: Redis, ttl_s: int = 86400) -> None:
        # redis-py's stubs type replies as unions of every wire type; we decode them ourselves.
        self.redis: Any = redis
        self.ttl_s = ttl_s
        self._published: dict[str, tuple[float, dict[str, str]]] = {}  # model -> (when read, state)
        self._submit = redis.register_script(_SUBMIT)  # sent by digest (EVALSHA) after the first call
        self._transition = redis.register_script(_TRANSITION)
        self._requeue = redis.register_script(_REQUEUE)
        self._rate = redis.register_script(_RATE)
        self._admit = redis.register_script(_ADMIT)
        self._take_stream = redis.register_script(_TAKE_STREAM)
        self._give_stream = redis.register_script(_GIVE_STREAM)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 86400) -> Store:
        # A Redis that cannot be reached (a pod being rescheduled, a partition) fails a call
        # within seconds instead of hanging it: callers wait and retry on their own terms.
        return cls(Redis.from_url(url, socket_connect_timeout=5), ttl_s)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- API keys --------------------------------------------------------------------------
    async def create_key(
        self,
        user: str,
        models: list[str],
        rate_limit: int = 0,
        max_active: int = MAX_ACTIVE,
        max_streams: int = MAX_STREAMS,
    ) -> tuple[str, ApiKey]:
        """Make a key; only its hash is stored. Returns (the key, shown once; its record)."""
        key = "nnf_" + secrets.token_urlsafe(24)
        digest = hash_key(key)
        record = ApiKey(digest[:12], user, models, rate_limit, time.time(), max_active, max_streams)
        await self.redis.hset(
            _key(digest),
            mapping={"key_id": record.key_id, "user": user, "models": json.dumps(models),
                     "rate_limit": rate_limit, "created": record.created, "max_active": max_active,
                     "max_streams": max_streams},
        )  # fmt: skip
        await self.redis.hset(_KEY_IDS, record.key_id, digest)
        return key, record

    async def lookup_key(self, key: str) -> ApiKey | None:
        return _api_key(_decode_hash(await self.redis.hgetall(_key(hash_key(key)))))

    async def list_keys(self) -> list[ApiKey]:
        found = []
        for digest in (await self.redis.hgetall(_KEY_IDS)).values():
            record = _api_key(_decode_hash(await self.redis.hgetall(_key(_text(digest)))))
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda k: k.created)

    async def revoke_key(self, key_id: str) -> bool:
        digest = await self.redis.hget(_KEY_IDS, key_id)
        if digest is None:
            return False
        await self.redis.delete(_key(_text(digest)))
        await self.redis.hdel(_KEY_IDS, key_id)
        return True

    async def authorize(self, key: str, client: str, window_s: int = 60) -> tuple[ApiKey | None, int]:
        """Look the key up, in one round trip with the client address's failed attempts.
        Returns (the key's record or None, 0 if the client may go on, else seconds to wait).
        A valid key is always let through: behind an ingress or a NAT many users share one
        address, and a stranger's guesses must not lock them out. Failing attempts are what is
        throttled: past AUTH_FAILURES_PER_MINUTE from one address, an unknown key gets a wait
        instead of an answer until the minute ends (keys carry 192 random bits, so the throttle
        bounds the cost of guessing, not its odds)."""
        now = time.time()
        window = int(now // window_s)
        failures = f"nnf:authfail:{client[:64]}:{window}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(_key(hash_key(key)))
            pipe.get(failures)
            raw, failed = await pipe.execute()
        record = _api_key(_decode_hash(raw))
        if record is not None:
            return record, 0
        if int(failed or 0) >= AUTH_FAILURES_PER_MINUTE:
            return None, max(1, int((window + 1) * window_s - now))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(failures)
            pipe.expire(failures, window_s * 2)
            await pipe.execute()
        return None, 0

    async def count_submit(self, key: ApiKey, jobs: int = 1, window_s: int = 60) -> int:
        """Count `jobs` submissions against the key's rate limit: 0 if allowed (and counted),
        else seconds until enough of the last `window_s` seconds' submissions have aged out.
        A sliding window over the server's clock: never more than `rate_limit` in any minute,
        with no boundary at which the count resets early."""
        if key.rate_limit <= 0:
            return 0
        member = secrets.token_hex(6)
        return int(await self._rate(
            [f"nnf:rate:{key.key_id}"], [window_s, key.rate_limit, jobs, member]
        ))  # fmt: skip

    async def admit(self, key: ApiKey, window_s: int = 60) -> int:
        """Admit one job for reading: -1 (and not counted) while the key has its `max_active`
        jobs queued or running, so a client waiting for room spends neither its rate limit nor
        the api's validation; else as count_submit (0: counted)."""
        member = secrets.token_hex(6)
        return int(await self._admit(
            [f"nnf:rate:{key.key_id}", _active(key.key_id)],
            [window_s, key.rate_limit, 1, member, _job(""), key.max_active],
        ))  # fmt: skip

    async def open_stream(self, key: ApiKey, wait_s: float = 0.0) -> bool:
        """Count an event websocket against the key's cap; False (and not counted) if the cap
        stays full for `wait_s`. A client that closes a stream and opens the next at once learns
        of its close before this server does, so its slot may still be held for a moment: the
        new stream waits for it (polling with backoff) instead of being refused."""
        deadline = time.monotonic() + wait_s
        delay = 0.01
        while not await self._take_stream([f"nnf:streams:{key.key_id}"], [key.max_streams]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)
        return True

    async def close_stream(self, key: ApiKey) -> None:
        await self._give_stream([f"nnf:streams:{key.key_id}"])

    async def streams_open(self, key: ApiKey) -> int:
        return int(await self.redis.get(f"nnf:streams:{key.key_id}") or 0)

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, job_id: str, key: ApiKey, model: str, payload: bytes, meta: dict[str, Any]) -> int | None:
        """Store the payload and job, announce `queued`, then enqueue (one atomic script).
        Returns the queue position, or None (nothing stored) when the key already has its
        `max_active` jobs queued or running."""
        now = time.time()
        record = {"id": job_id, "user": key.user, "key": key.key_id, "model": model, "state": "queued",
                  "created": str(now), "bytes": str(len(payload)), "meta": json.dumps(meta)}  # fmt: skip
        fields = [item for pair in record.items() for item in pair]
        keys = [_job(job_id), _payload(job_id), _queued(model), _events(job_id), _queue(model),
                _RECENT, _recent(key.user), _active(key.key_id)]  # fmt: skip
        args: list[str | int | float | bytes] = [job_id, key.user, now, self.ttl_s, payload, key.max_active,
                                                 _job(""), *fields]  # fmt: skip
        position = int(await self._submit(keys, args))
        return None if position < 0 else position

    async def job(self, job_id: str) -> JobRecord | None:
        job = _job_record(_decode_hash(await self.redis.hgetall(_job(job_id))))
        return None if job is None else (await self._with_positions([job]))[0]

    async def _with_positions(self, jobs: list[JobRecord]) -> list[JobRecord]:
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
        (or does not exist); a job starts ("running") only from "queued", so never twice at once."""
        keys, args = self._transition_call(Transition(job_id, state, data, result, fields))
        return await self._transition(keys, args) is not None

    async def transition_many(self, changes: list[Transition]) -> list[bool]:
        """Several jobs' transitions (a batch's starts or ends) in one round trip, each as atomic
        and as final as `transition`'s."""
        if not changes:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for change in changes:
                keys, args = self._transition_call(change)
                await self._transition(keys, args, client=pipe)
            replies = await pipe.execute()
        return [reply is not None for reply in replies]

    def _transition_call(self, change: Transition) -> tuple[list[str], list[str | int | bytes]]:
        state, result = change.state, change.result
        stamp = {"running": "started"}.get(state, "finished" if state in TERMINAL else "")
        mapping: dict[str, Any] = {"state": state, **{k: v for k, v in change.fields.items() if v is not None}}
        if stamp:
            mapping[stamp] = change.at
        if change.runner:
            mapping["runner"] = change.runner
        flat = [_text(item) for pair in mapping.items() for item in pair]
        job_id = change.job_id
        keys = [_job(job_id), _events(job_id), _payload(job_id), _result(job_id), _OUTCOMES, _active(""),
                _stats(""), _timings("")]  # fmt: skip
        args: list[str | int | bytes] = [
            job_id,
            state,
            int(state in TERMINAL),
            json.dumps(change.data or {}),
            self.ttl_s,
        ]
        return keys, [*args, int(result is not None), result or b"", _queued(""), change.runner, TIMINGS_KEPT, *flat]

    async def requeue(self, job_id: str, model: str, reason: str) -> bool:
        """Put a job that has not ended back in its queue (in its original place) to run again;
        False if it ended meanwhile."""
        keys = [_job(job_id), _events(job_id), _queued(model)]
        return await self._requeue(keys, [job_id, json.dumps(reason), self.ttl_s]) is not None

    async def log(self, job_id: str, message: str) -> None:
        await self._event(job_id, "log", {"message": message})

    async def _event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        event_id = await self.redis.xadd(_events(job_id), {"type": kind, "data": json.dumps(data)})
        await self.redis.expire(_events(job_id), self.ttl_s)
        return _text(event_id)

    async def tokens(self, steps: list[tuple[str, int, list[int]]]) -> None:
        """Generation steps' new tokens, as `tokens` events on each job's stream (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, step, tokens in steps:
                pipe.xadd(_events(job_id), {"type": "tokens", "data": json.dumps({"step": step, "tokens": tokens})})
                pipe.expire(_events(job_id), self.ttl_s)
            await pipe.execute()

    async def events(self, job_id: str, after: str = "0-0", block_ms: int | None = None) -> list[JobEvent]:
        """Events after `after` (an event id), waiting up to block_ms for the first one."""
        reply = await self.redis.xread({_events(job_id): after}, count=100, block=block_ms)
        found = []
        for _stream, entries in reply or []:
            for event_id, fields in entries:
                raw = _decode_hash(fields)
                event = {"id": _text(event_id), "type": raw["type"], **json.loads(raw["data"])}
                found.append(cast(JobEvent, event))
        return found

    async def events_of_many(
        self, cursors: dict[str, str], waker: str, waker_cursor: str, block_ms: int
    ) -> tuple[dict[str, list[JobEvent]], str]:
        """Several jobs' events after their cursors, in one blocking read that also ends when
        `wake(waker)` is called (a job was added to the set). Returns (events by job, the waker's
        new cursor)."""
        streams = {_events(job_id): after for job_id, after in cursors.items()}
        streams[_waker(waker)] = waker_cursor
        reply = await self.redis.xread(streams, count=100, block=block_ms)
        found: dict[str, list[JobEvent]] = {}
        for stream, entries in reply or []:
            name = _text(stream)
            if name == _waker(waker):
                waker_cursor = _text(entries[-1][0])
                continue
            job_id = name.removeprefix(_events(""))
            for event_id, fields in entries:
                raw = _decode_hash(fields)
                event = {"id": _text(event_id), "type": raw["type"], **json.loads(raw["data"])}
                found.setdefault(job_id, []).append(cast(JobEvent, event))
        return found, waker_cursor

    async def save_batch(self, batch_id: str, user: str, job_ids: list[str]) -> None:
        """A batch: the jobs one request submitted, followed on one event stream (kept as long
        as their results)."""
        await self.redis.set(_batch(batch_id), json.dumps({"user": user, "jobs": job_ids}), ex=self.ttl_s)

    async def batch(self, batch_id: str) -> dict[str, Any] | None:
        """{"user", "jobs"} of a batch, or None (unknown or expired)."""
        raw = await self.redis.get(_batch(batch_id))
        return cast(dict[str, Any], json.loads(raw)) if raw is not None else None

    async def wake(self, waker: str) -> None:
        """End a blocked `events_of_many` on this waker (kept to its last entry, for a minute)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(_waker(waker), {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(_waker(waker), 60)
            await pipe.execute()

    async def follow(self, job_id: str, after: str = "0-0", block_ms: int = 15_000) -> AsyncIterator[JobEvent]:
        """Every event of the job after `after`, up to and including a final one, as Redis hands
        them over (blocking reads, no polling). A Redis restart or a dropped connection costs a
        retry, never the follower: whoever waits on a job hears its end."""
        wait_s = 0.1
        while True:
            try:
                batch = await self.events(job_id, after, block_ms)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("following job %s: Redis unreachable (%s); retrying", job_id, type(exc).__name__)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 2.0)
                continue
            wait_s = 0.1
            for event in batch:
                after = event["id"]
                yield event
                if event["type"] in TERMINAL:
                    return

    # -- persistent edits: one user's, on one model; never read under another user's name ----------
    async def add_edit(self, user: str, model: str, record: EditRecord, payload: bytes, limit: int) -> bool:
        """Store an edit unless the user already has `limit` on this model."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(_edits(user, model))
                    if await pipe.hlen(_edits(user, model)) >= limit:
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(_edits(user, model), record["id"], json.dumps(record))
                    pipe.hset(_edit_payloads(user, model), record["id"], payload)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def edits(self, user: str, model: str) -> list[EditRecord]:
        raw = await self.redis.hvals(_edits(user, model))
        records = [cast(EditRecord, json.loads(value)) for value in raw]
        return sorted(records, key=lambda r: r["created"])

    async def edit_payloads(self, user: str, model: str, edit_ids: list[str]) -> list[bytes | None]:
        """The edits' envelopes, in order (None where the user has no such edit)."""
        if not edit_ids:
            return []
        found: list[bytes | None] = await self.redis.hmget(_edit_payloads(user, model), edit_ids)
        return found

    async def remove_edit(self, user: str, model: str, edit_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(_edits(user, model), edit_id)
            pipe.hdel(_edit_payloads(user, model), edit_id)
            removed, _ = await pipe.execute()
        return bool(removed)

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

    async def result_file(self, job_id: str) -> str | None:
        """The result store's name for a large result, if the job's result went there."""
        name = await self.redis.hget(_job(job_id), "result_file")
        return None if name is None else _text(name)

    async def result(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(_result(job_id))
        return data

    async def results(self, job_ids: list[str]) -> list[bytes | None]:
        """Several jobs' results kept in Redis, in one round trip (None where not there)."""
        if not job_ids:
            return []
        found: list[bytes | None] = await self.redis.mget([_result(job_id) for job_id in job_ids])
        return found

    async def dequeued(self, model: str, job_ids: list[str]) -> None:
        """The jobs left the queue for a replica, as one batch: they no longer count in others'
        positions, and the batch counts in the model's batch sizes."""
        if job_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(_queued(model), *job_ids)
                pipe.hincrby(_stats(model), "batches", 1)
                pipe.hincrby(_stats(model), "batch_jobs", len(job_ids))
                await pipe.execute()

    async def queue_depth(self, model: str) -> tuple[int, float | None]:
        """(jobs waiting, seconds the oldest has waited)."""
        depth = await self.redis.zcard(_queued(model))
        oldest = await self.redis.zrange(_queued(model), 0, 0, withscores=True)
        wait = time.time() - float(oldest[0][1]) if oldest else None
        return int(depth), wait

    async def recent_jobs(self, limit: int = 20, user: str | None = None) -> list[JobRecord]:
        """The newest jobs, of everyone or of one user (each list keeps the last 200)."""
        ids = await self.redis.lrange(_recent(user) if user else _RECENT, 0, limit - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(_job(_text(job_id)))
            records = await pipe.execute()
        jobs = [job for job in (_job_record(_decode_hash(raw)) for raw in records) if job is not None]
        return await self._with_positions(jobs)

    async def outcomes(self) -> dict[str, int]:
        return {k: int(v) for k, v in _decode_hash(await self.redis.hgetall(_OUTCOMES)).items()}

    # -- the status page's history (services/scheduler/history.py writes it) ---------------------
    async def now(self) -> float:
        """Redis's clock: one clock for every process that samples or reads the history."""
        seconds, micros = await self.redis.time()
        return int(seconds) + int(micros) / 1e6

    async def model_stats(self, model: str) -> ModelStats:
        """The model's counts since Redis was created: jobs ended, batches sent and their jobs."""
        values = await self.redis.hmget(_stats(model), ["finished", "batches", "batch_jobs"])
        finished, batches, batch_jobs = (int(v or 0) for v in values)
        return ModelStats(finished, batches, batch_jobs)

    async def read_model(self, model: str, after: str | None) -> ModelReading:
        """One instant of the model's counters (one round trip), with the (wait, run) of its jobs
        that ended after the timings cursor `after` (None: none; the cursor starts at the newest)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hmget(_stats(model), ["finished", "batches", "batch_jobs"])
            pipe.zcard(_queued(model))
            pipe.zremrangebyscore(_replicas(model), "-inf", time.time())
            pipe.zcard(_replicas(model))
            if after is None:
                pipe.xrevrange(_timings(model), count=1)
            else:
                pipe.xrange(_timings(model), min="(" + after, count=TIMINGS_KEPT)
            clock, counts, depth, _, replicas, entries = await pipe.execute()
        timings = [] if after is None else [(float(f[b"w"]), float(f[b"r"])) for _, f in entries]
        cursor = _text(entries[-1][0]) if entries else (after or "0-0")
        finished, batches, batch_jobs = (int(v or 0) for v in counts)
        return ModelReading(int(clock[0]) + int(clock[1]) / 1e6, ModelStats(finished, batches, batch_jobs),
                            int(depth), int(replicas), timings, cursor)  # fmt: skip

    async def take_history_turn(self, owner: str, period_s: float) -> bool:
        """Whether `owner` records the next sample: the first to ask in each period does, so any
        number of schedulers (or restarts) write one sample a period between them."""
        return bool(await self.redis.set(_HISTORY_TURN, owner, nx=True, px=max(1, int(period_s * 1000))))

    async def history_state(self, model: str) -> dict[str, Any] | None:
        """What the last sample of the model was computed from (its counters and cursor)."""
        raw = await self.redis.get(_history_state(model))
        return None if raw is None else cast(dict[str, Any], json.loads(raw))

    async def add_history(self, model: str, sample: dict[str, Any], state: dict[str, Any], keep: int,
                          ttl_s: int) -> None:  # fmt: skip
        """Append a sample, keep the newest `keep`, and let a model that is no longer sampled
        (gone from the catalog) fade after `ttl_s`."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(_history(model), json.dumps(sample))
            pipe.ltrim(_history(model), -keep, -1)
            pipe.expire(_history(model), ttl_s)
            pipe.set(_history_state(model), json.dumps(state), ex=ttl_s)
            pipe.expire(_timings(model), ttl_s)  # here, once a period, rather than on every job's end
            await pipe.execute()

    async def history(self, models: list[str], last: int = 0) -> dict[str, list[dict[str, Any]]]:
        """Each model's samples, oldest first (only the newest `last` if given): one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.lrange(_history(model), -last if last else 0, -1)
            replies = await pipe.execute()
        return {model: [json.loads(raw) for raw in reply] for model, reply in zip(models, replies, strict=True)}

    async def heartbeat(self, component: str, ttl_s: int = 10) -> None:
        await self.redis.set(_HEARTBEAT + component, time.time(), ex=ttl_s)

    async def alive(self, prefix: str) -> list[str]:
        return [_text(k).removeprefix(_HEARTBEAT) async for k in self.redis.scan_iter(f"{_HEARTBEAT}{prefix}*")]

    # -- queues (a stream per model, one consumer group of schedulers) ------------------------
    async def ensure_queue(self, model: str) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self.redis.xgroup_create(_queue(model), GROUP, id="0", mkstream=True)

    async def read_queues(
        self, models: list[str], consumer: str, pending: bool = False, block_ms: int | None = None, count: int = 256
    ) -> list[QueueEntry]:
        """New entries for `consumer` (or, with pending=True, those it read before and never
        acknowledged, e.g. before a restart)."""
        streams = {_queue(name): "0" if pending else ">" for name in models}
        reply = await self.redis.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        found: list[QueueEntry] = []
        for stream, entries in reply or []:
            found += _entries(_text(stream).removeprefix(_QUEUE_PREFIX), entries)
        return found

    async def reclaim(self, model: str, consumer: str, min_idle_ms: int) -> list[QueueEntry]:
        """Take over entries another (dead) consumer read but never acknowledged."""
        found: list[QueueEntry] = []
        start = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                _queue(model), GROUP, consumer, min_idle_time=min_idle_ms, start_id=start, count=100
            )
            start, entries = _text(reply[0]), reply[1]
            found += _entries(model, entries)
            if start == "0-0" or not entries:
                return found

    async def take_over(self, model: str, consumer: str, alive: set[str]) -> list[QueueEntry]:
        """Claim every entry held by a consumer (scheduler) not in `alive`, however recently it
        read them, and forget that consumer once it holds nothing."""
        found: list[QueueEntry] = []
        try:
            consumers = await self.redis.xinfo_consumers(_queue(model), GROUP)
        except ResponseError:  # no stream or group yet
            return found
        for info in consumers:
            name = _text(info["name"])
            if name in alive:
                continue
            pending = await self.redis.xpending_range(_queue(model), GROUP, "-", "+", 1000, consumername=name)
            ids = [item["message_id"] for item in pending]
            if ids:
                claimed = await self.redis.xclaim(_queue(model), GROUP, consumer, 0, ids)
                found += _entries(model, [c for c in claimed if c and c[1]])
            if len(ids) < 1000:
                await self.redis.xgroup_delconsumer(_queue(model), GROUP, name)
        return found

    async def ack(self, entries: list[QueueEntry]) -> None:
        """The entries' jobs reached a final state: drop them from their streams."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xack(_queue(entry.model), GROUP, entry.stream_id)
                pipe.xdel(_queue(entry.model), entry.stream_id)
            await pipe.execute()

    # -- models and their replicas ------------------------------------------------------------
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

    async def published(self, name: str, max_age_s: float = 1.0) -> dict[str, str]:
        """A model's state and module structure, as read from Redis at most `max_age_s` ago: the
        gateway checks every job against them, and the structure (tens of kilobytes) changes
        only when the model is deployed again."""
        now = time.monotonic()
        cached = self._published.get(name)
        if cached is None or now - cached[0] > max_age_s:
            cached = (now, await self.model(name, "state", "structure"))
            self._published[name] = cached
        return cached[1]

    async def replica_alive(self, model: str, replica: str, ttl_s: float, pid: int = 0) -> None:
        """A replica holding `model` (process `pid`) says it is alive for the next ttl_s seconds."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            # A sorted set by expiry time counts exactly (a scan may still return expired keys).
            pipe.zadd(_replicas(model), {replica: now + ttl_s})
            pipe.set(_replica(model, replica), pid, px=int(ttl_s * 1000))
            pipe.hset(_model(model), "last_alive", now)
            await pipe.execute()

    async def replica_pids(self, model: str) -> list[int]:
        """The process ids of the replicas of `model` alive now (operators' and tests' view)."""
        keys = [k async for k in self.redis.scan_iter(_replica(model, "*"), count=100)]
        return [int(v) for v in await self.redis.mget(keys) if v is not None] if keys else []

    async def replica_gone(self, model: str, replica: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(_replicas(model), replica)
            pipe.delete(_replica(model, replica))
            await pipe.execute()

    async def live_replicas(self, model: str) -> int:
        """Replicas of `model` whose last word is recent (each says so on its health check)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(_replicas(model), "-inf", time.time())
            pipe.zcard(_replicas(model))
            _, live = await pipe.execute()
        return int(live)


def _entries(model: str, entries: list[tuple[Any, dict[Any, Any]]]) -> list[QueueEntry]:
    found = []
    for stream_id, fields in entries:
        if not fields:
            continue  # deleted meanwhile
        raw = _decode_hash(fields)
        found.append(QueueEntry(model, _text(stream_id), raw["job"], raw.get("user", "")))
    return found
