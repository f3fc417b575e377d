"""The status page's history: one sample per model every `history_interval_s`, kept in Redis.

    sampler = HistorySampler(store, ["gpt2"], Settings(), owner="scheduler-0")
    await sampler.run(stopping)        # or: await sampler.sample("gpt2") for one sample now

Why here and why so: the history must outlive any api replica and any restart, so it lives in
Redis, and it must be written once per interval however many schedulers run. Every scheduler
runs a sampler; each period the first to take the turn in Redis (a key set with NX and a
period's expiry) samples, the others skip. A sample is computed from Redis alone (counters the
api, the scheduler and the replicas keep there, and the previous sample's counters), so any
scheduler can take the next turn where another left off, and rates are measured on Redis's
clock. Memory is bounded whatever happens: at most HISTORY_MAX_SAMPLES samples per model
(trimmed on every write) and a TTL on every key, so a model gone from the catalog fades.

A sample (all aggregates; no job ids, no users):
- t: Redis's clock; queue_depth and replicas (live): at that instant.
- jobs_per_s: jobs that ended (any final state) per second since the previous sample.
- wait_p50_s, wait_p95_s, run_p50_s, run_p95_s: over the jobs that ended since the previous
  sample and had started (wait: created to started; run: started to ended); None without any.
- batch_size: mean jobs per batch the schedulers sent since the previous sample; None without any.
Rates and percentiles are None in a model's first sample (there is nothing to measure from).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from ..common.settings import Settings
from ..common.store import ModelReading, Store

log = logging.getLogger("nnfabric.history")

# An hour at one sample a second: a shorter interval (tests) keeps a shorter history, never more.
HISTORY_MAX_SAMPLES = 3600


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between the nearest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class HistorySampler:
    def __init__(self, store: Store, models: list[str], settings: Settings, owner: str) -> None:
        self.store = store
        self.models = models
        self.interval_s = settings.history_interval_s
        self.keep = max(2, min(HISTORY_MAX_SAMPLES, math.ceil(settings.history_s / self.interval_s)))
        # Keys outlive the window by a little: a restarted sampler continues the same history.
        self.ttl_s = max(60, math.ceil(settings.history_s * 2))
        self.owner = owner

    async def run(self, stopping: asyncio.Event) -> None:
        """Take the turn and sample when it is ours, until `stopping` is set. Asking five times a
        period keeps the samples at most a fifth of a period late; a failure (Redis away) costs
        that period's sample, nothing more."""
        failing = False
        while not stopping.is_set():
            try:
                await self.tick()
                if failing:
                    log.info("history sampling resumed")
                failing = False
            except Exception as exc:  # Redis restarting, or a bug: the next period tries again
                if not failing:  # once per spell, not five times a period
                    log.warning("history samples skipped until Redis answers: %s: %s", type(exc).__name__, exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval_s / 5)

    async def tick(self) -> bool:
        """Sample every model if this period's turn is ours; True if it was."""
        if not await self.store.take_history_turn(self.owner, self.interval_s):
            return False
        for model in self.models:
            await self.sample(model)
        return True

    async def sample(self, model: str) -> dict[str, Any]:
        """Record one sample of the model now (whoever's turn it is) and return it."""
        state = await self.store.history_state(model)
        reading = await self.store.read_model(model, None if state is None else state["cursor"])
        sample = _sample(reading, state)
        await self.store.add_history(model, sample, _state(reading, sample["t"]), self.keep, self.ttl_s)
        return sample


def _state(reading: ModelReading, t: float) -> dict[str, Any]:
    stats = reading.stats
    return {"t": t, "finished": stats.finished, "batches": stats.batches, "batch_jobs": stats.batch_jobs,
            "cursor": reading.cursor}  # fmt: skip


def _sample(reading: ModelReading, before: dict[str, Any] | None) -> dict[str, Any]:
    t = round(reading.at, 3)
    stats = reading.stats
    sample: dict[str, Any] = {
        "t": t, "queue_depth": reading.queue_depth, "replicas": reading.replicas, "jobs_per_s": None,
        "wait_p50_s": None, "wait_p95_s": None, "run_p50_s": None, "run_p95_s": None, "batch_size": None,
    }  # fmt: skip
    if before is None or t <= before["t"]:
        return sample
    ended = stats.finished - before["finished"]
    batches, batch_jobs = stats.batches - before["batches"], stats.batch_jobs - before["batch_jobs"]
    if ended >= 0:  # negative: Redis lost its counters (a flush, a fresh Redis); measure from here
        sample["jobs_per_s"] = ended / (t - before["t"])
    if batches > 0 and batch_jobs >= 0:
        sample["batch_size"] = batch_jobs / batches
    if reading.timings:
        waits = [wait for wait, _ in reading.timings]
        runs = [run for _, run in reading.timings]
        for name, values in (("wait", waits), ("run", runs)):
            sample[f"{name}_p50_s"] = round(percentile(values, 0.5), 6)
            sample[f"{name}_p95_s"] = round(percentile(values, 0.95), 6)
    return sample
