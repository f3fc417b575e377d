"""Ray Serve: one deployment per catalog model; each replica loads its model once and keeps it.

    deploy_catalog(catalog, settings)           # serve.run for every model (HTTP proxy off)
    handle = serve.get_deployment_handle("model-gpt2", app_name="model-gpt2")
    await handle.run_batch.remote(["job-id", ...])

Replicas are long-lived: routing changes never redeploy them (NDIF's lesson). Results and
events go to Redis; a replica answers the scheduler with each job's final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ray import serve
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..common.catalog import SLOTS_PER_REPLICA, Catalog, ModelSpec
from ..common.result_store import ResultStore
from ..common.settings import Settings
from ..common.store import Store, Transition
from .executor import BatchExecutor, Decoded, Outcome
from .pipeline.actors import Stages
from .pipeline.links import StageLost

log = logging.getLogger("nnfabric.worker")
T = TypeVar("T")
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_REDIS_RETRY_MAX_S = 0.5  # the longest pause between tries while Redis is away: back within a second

# Serve asks each replica for its health this often; each answer also renews the replica's
# liveness in Redis for LIVENESS_S, so /v1/models counts only replicas that answered lately.
HEALTH_PERIOD_S = 1.0
LIVENESS_S = 3 * HEALTH_PERIOD_S  # a replica silent this long no longer counts: health says so within 5 s


@serve.deployment(
    max_ongoing_requests=SLOTS_PER_REPLICA, health_check_period_s=HEALTH_PERIOD_S, graceful_shutdown_timeout_s=5
)
class ModelReplica:
    # Serve awaits an async constructor (so the replica can use the async Store); typeshed says None.
    async def __init__(self, spec: dict[str, Any], settings: dict[str, Any]) -> None:  # type: ignore[misc]
        from .loader import load_model, tokenizer_files

        self.spec = ModelSpec.model_validate(spec)
        self.settings = Settings.model_validate(settings)
        self.store = Store.from_url(self.settings.redis_url, self.settings.result_ttl_s)
        self.results = ResultStore(self.settings.result_store_dir)
        self.replica = uuid.uuid4().hex[:12]
        self.stuck = ""  # why this replica must be replaced, once it must
        self._turn = asyncio.Lock()  # one batch on the model at a time; the next one waits here, decoded
        self._recordings: set[asyncio.Task[list[bool]]] = set()  # outcomes waiting for Redis (owned here)
        self._held = 0  # bytes of results kept in memory until Redis records them
        self.jobs_run = self.batches_run = 0
        self._started_early: set[str] = set()  # jobs marked running to join a generation that had ended
        self._waiting = 0  # batches waiting for their turn on the model (no joining meanwhile)
        self._token_steps: list[list[tuple[str, int, list[int]]]] = []  # streamed tokens not yet sent
        self._token_flush: asyncio.Future[None] | None = None  # the one task sending them, in order
        self.stages: Stages | None = None
        await self.store.set_model(self.spec.name, state="loading")
        try:
            if self.spec.staged:
                # The weights live on the stage actors; this process keeps the model's shell.
                pipeline, self.stages = await asyncio.to_thread(self._start_stages)
                self.executor = BatchExecutor(self.spec, pipeline.root, pipeline.lm.tokenizer, self.settings, pipeline)
                tokenizer = pipeline.lm.tokenizer
            else:
                model, tokenizer = await asyncio.to_thread(load_model, self.spec)
                self.executor = BatchExecutor(self.spec, model, tokenizer, self.settings)
        except Exception as exc:
            await self.store.set_model(self.spec.name, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        await self.store.set_model(
            self.spec.name,
            state="ready",
            structure=json.dumps(self.executor.tree.to_json()),
            tokenizer=json.dumps(tokenizer_files(tokenizer)),
            stages=json.dumps(self.stages.places if self.stages else []),
            error="",
        )
        await self.store.replica_alive(self.spec.name, self.replica, LIVENESS_S, os.getpid())

    def _start_stages(self) -> tuple[Any, Stages]:
        from transformers import AutoTokenizer

        from .loader import prepare
        from .pipeline.actors import start_stages

        source = prepare(self.spec)
        return start_stages(self.spec, source, AutoTokenizer.from_pretrained(self.spec.tokenizer or source))

    async def _lost(self, why: str) -> None:
        """Part of this replica's model is gone: it takes no more work, and health fails, so that
        Serve replaces it whole (every stage with it)."""
        if not self.stuck:
            self.stuck = f"{why}; the replica and all its stages are being replaced"
            log.error("replica of %s: %s", self.spec.name, self.stuck)
            await self.store.set_model(self.spec.name, lost=f"{time.time():.0f} {self.stuck}")
            # No longer counted as live: the scheduler holds jobs until a whole replica is back.
            await self.store.replica_gone(self.spec.name, self.replica)

    async def _run_watched(self, jobs: list[Decoded]) -> dict[str, Outcome]:
        """Run the batch in a worker thread. The deadline is checked between every op, but one
        native op cannot be interrupted: past the deadline by a margin, the replica gives up on
        the batch, fails the job that is stuck, keeps what finished, refuses further work and
        reports itself unhealthy, so Serve replaces its process."""
        limit = self.spec.limits.timeout_s
        watchdog_s = limit * (len(jobs) + 1) + self.settings.watchdog_margin_s
        work = asyncio.ensure_future(asyncio.to_thread(self.executor.run_decoded, jobs))
        try:
            return await asyncio.wait_for(asyncio.shield(work), watchdog_s)
        except StageLost as exc:
            # The job that was running goes back to the queue (the scheduler runs it once more,
            # on a replica that is whole); those that finished keep their outcomes.
            await self._lost(str(exc))
            return dict(self.executor.finished)
        except TimeoutError:
            self.stuck = f"a job ran {watchdog_s:.0f} s, past its time limit, and could not be stopped"
            log.error("replica of %s is stuck (%s); asking to be replaced", self.spec.name, self.stuck)
            outcomes = dict(self.executor.finished)
            message = (f"the job ran past its time limit ({limit:g} s) inside one operation that could not be "
                       "interrupted; the replica that ran it is being replaced")  # fmt: skip
            own = {job[0] for job in jobs}  # jobs that joined from other batches are theirs to settle
            for job_id in [job_id for job_id in list(self.executor.running) if job_id in own]:
                outcomes[job_id] = Outcome(error=message, seconds=watchdog_s)
            return outcomes

    async def run_batch(self, job_ids: list[str]) -> dict[str, str]:
        """Run a batch; each job's final state. Up to SLOTS_PER_REPLICA batches are in flight here:
        while one runs, the next one's payloads are fetched and decoded, and it starts the moment
        the model is free. A job is marked running only when its batch starts, so one cancelled
        while it waited here never runs; one that another dispatch already started is reported
        as "elsewhere" and left alone (a scheduler that took over dispatched it again).

        Redis may be away (restarting): every step that needs it waits for it, and the outcomes
        of jobs that ran are kept until Redis records them, exactly once, even if the caller gives
        up meanwhile. Only this process dying loses them (the jobs then run again)."""
        if self.stuck:
            raise RuntimeError(f"this replica is being replaced: {self.stuck}")
        store = self.store
        runner = f"{self.replica}-{uuid.uuid4().hex[:8]}"  # this dispatch, in the jobs' records
        states: dict[str, str] = {}
        fetched: list[tuple[str, bytes]] = []
        for job_id, payload in zip(job_ids, await self._patiently(lambda: store.payloads(job_ids), "fetching payloads"),
                                   strict=True):  # fmt: skip
            if payload is None:
                states.update(await self._settle({job_id: Outcome(error="the job's payload has expired")}, runner))
            else:
                fetched.append((job_id, payload))
        decoded, invalid = await asyncio.to_thread(self.executor.prepare, fetched) if fetched else ([], {})
        states.update(await self._settle(invalid, runner))  # refused jobs fail now: they need no turn on the model
        # The caller may give up (its timeout, or it died): a batch still waiting for its turn then
        # never starts; one that started runs to the end and records every outcome.
        abandoned = asyncio.Event()
        turn = asyncio.ensure_future(self._when_free(decoded, len(job_ids), abandoned, runner))
        turn.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            states.update(await asyncio.shield(turn))
        except asyncio.CancelledError:
            abandoned.set()
            raise
        return states

    async def _when_free(
        self, decoded: list[Decoded], size: int, abandoned: asyncio.Event, runner: str
    ) -> dict[str, str]:
        store = self.store
        states: dict[str, str] = {}
        joined: list[asyncio.Future[dict[str, str]]] = []
        if self._turn.locked() and not abandoned.is_set() and not self.stuck and not self._waiting:
            # A generation running now takes this batch's generate jobs at its next step (unless
            # a batch already waits for the model: a stream of joiners must not starve it).
            decoded, joined = await self._join(decoded, size, runner, states)
        if not decoded:
            for found in await asyncio.gather(*joined):
                states.update(found)
            return states
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1
        async with _held(self._turn):
            if abandoned.is_set():
                return states
            if self.stuck:  # the batch ahead of this one could not be stopped: this one never started
                raise RuntimeError(f"this replica is being replaced: {self.stuck}")
            jobs = [job for job in decoded if job[0] in self._started_early]
            self._started_early.difference_update(job[0] for job in jobs)
            decoded = [job for job in decoded if job not in jobs]
            starts = [Transition(job[0], "running", {"batch": size}, runner=runner) for job in decoded]
            started = await self._patiently(lambda: store.transition_many(starts), "starting a batch") if starts else []
            for job, ok in zip(decoded, started, strict=True):
                if ok:
                    jobs.append(job)
                else:
                    states[job[0]] = await self._not_started(job[0])
            outcomes, early = await self._run_reporting(jobs, runner)
            self.jobs_run += len(jobs)
            self.batches_run += 1 if jobs else 0
        await asyncio.sleep(0)  # the outcomes heard last are scheduled by now
        for job_id in [job_id for job_id, _, _ in jobs if job_id not in outcomes]:
            states[job_id] = "retry"  # never started here: the scheduler queues it again
        states.update(await self._settle({k: v for k, v in outcomes.items() if k not in early}, runner))
        for found in await asyncio.gather(*early.values()):
            states.update(found)
        for found in await asyncio.gather(*joined):
            states.update(found)
        return states

    async def _run_reporting(
        self, jobs: list[Decoded], runner: str
    ) -> tuple[dict[str, Outcome], dict[str, asyncio.Future[dict[str, str]]]]:
        """Run the batch; a generation's jobs end one by one, and each is recorded the moment it
        ends (the settlements returned), not when the last job (perhaps a later joiner) does."""
        early: dict[str, asyncio.Future[dict[str, str]]] = {}
        loop = asyncio.get_running_loop()

        def ended(job_id: str, outcome: Outcome) -> None:
            loop.call_soon_threadsafe(
                lambda: early.setdefault(job_id, asyncio.ensure_future(self._settle({job_id: outcome}, runner)))
            )

        self.executor.on_outcome = ended
        self.executor.on_tokens = lambda steps: loop.call_soon_threadsafe(self._publish_tokens, steps)
        try:
            return (await self._run_watched(jobs) if jobs else {}), early
        finally:
            self.executor.on_outcome = self.executor.on_tokens = None

    async def _join(
        self, decoded: list[Decoded], size: int, runner: str, states: dict[str, str]
    ) -> tuple[list[Decoded], list[asyncio.Future[dict[str, str]]]]:
        """Start this batch's jobs that can join the generation running now; the jobs left for a
        turn of their own, and the joined jobs' settlements (each recorded the moment it ends)."""
        candidates = self.executor.joinable(decoded)
        if not candidates:
            return decoded, []
        starts = [Transition(job[0], "running", {"batch": size}, runner=runner) for job in candidates]
        started = await self._patiently(lambda: self.store.transition_many(starts), "starting jobs")
        ready = []
        for job, ok in zip(candidates, started, strict=True):
            if ok:
                ready.append(job)
            else:
                states[job[0]] = await self._not_started(job[0])
        futures = self.executor.join(ready)
        rest = [job for job in decoded if job not in candidates]
        # Those the generation ended too soon to take: started already, they take the next turn.
        late = [job for job in ready if job[0] not in futures]
        if late:
            rest = [*rest, *late]
            self._started_early.update(job[0] for job in late)
        self.jobs_run += len(futures)
        # Its own time, the generation's rest, and a run alone after it if it must leave (NeedsSolo).
        limit = self.spec.limits.timeout_s * (len(futures) + 3) + self.settings.watchdog_margin_s

        async def settle(job_id: str, future: Any) -> dict[str, str]:
            try:
                outcome = await asyncio.wait_for(asyncio.wrap_future(future), limit)
            except TimeoutError:
                outcome = Outcome(error="the job ran past its time limit in a generation that could not stop it")
            return await self._settle({job_id: outcome}, runner)

        return rest, [asyncio.ensure_future(settle(job_id, future)) for job_id, future in futures.items()]

    async def _patiently(self, action: Callable[[], Awaitable[T]], what: str) -> T:
        """`action` (calls to Redis), tried again until Redis answers: an outage delays the
        replica's bookkeeping, never loses it."""
        delay, warned = 0.05, False
        while True:
            try:
                return await action()
            except _REDIS_DOWN as exc:
                if not warned:
                    log.warning("replica of %s: Redis unreachable while %s (%s); waiting for it",
                                self.spec.name, what, type(exc).__name__)  # fmt: skip
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REDIS_RETRY_MAX_S)

    async def _not_started(self, job_id: str) -> str:
        """Why a job of this batch was not started here: it ended meanwhile (cancelled), or another
        dispatch of it is running it ("elsewhere")."""
        found = (await self._patiently(lambda: self.store.states([job_id]), "reading a job's state"))[0]
        if found is None:
            return "cancelled"
        return "elsewhere" if found[0] == "running" else found[0]

    def _publish_tokens(self, steps: list[tuple[str, int, list[int]]]) -> None:
        """Send streamed tokens (on the event loop): one task sends them in order, several steps
        in one round trip when it falls behind."""
        self._token_steps.append(steps)
        if self._token_flush is None or self._token_flush.done():
            self._token_flush = asyncio.ensure_future(self._flush_tokens())

    async def _flush_tokens(self) -> None:
        while self._token_steps:
            found = [step for steps in self._token_steps for step in steps]
            self._token_steps.clear()
            try:
                await self.store.tokens(found)
            except Exception as exc:  # best effort: the job's result holds every token
                log.warning("replica of %s: streamed tokens not sent: %s", self.spec.name, exc)

    async def _settle(self, outcomes: dict[str, Outcome], runner: str) -> dict[str, str]:
        """Record every outcome of a batch (one round trip to Redis): "completed" with the result,
        "failed" with the reason, or "cancelled" where a cancel got there first. While Redis is
        away the outcomes wait here (see `_recorded`). A job's streamed tokens go first."""
        if self._token_flush is not None and not self._token_flush.done():
            await asyncio.shield(self._token_flush)
        changes: list[Transition] = []
        files: dict[str, str] = {}
        for job_id, outcome in outcomes.items():
            if outcome.ok and outcome.result is not None:
                done: dict[str, Any] = {"result": f"/v1/jobs/{job_id}/result", "bytes": len(outcome.result)}
                done["seconds"] = round(outcome.seconds, 4)
                done["shared"] = outcome.shared
                if len(outcome.result) >= self.settings.result_store_min_bytes:
                    # Large: on the shared result store, so Redis's memory stays flat; Redis keeps its name.
                    files[job_id] = await asyncio.to_thread(self.results.write, job_id, outcome.result)
                    changes.append(Transition(job_id, "completed", done, fields={"result_file": files[job_id]},
                                              runner=runner))  # fmt: skip
                else:
                    # Stored by the same script that marks the job completed, unless it was cancelled.
                    changes.append(Transition(job_id, "completed", done, outcome.result, runner=runner))
            else:
                data = {"message": outcome.error, "node": outcome.node, "trace": outcome.trace}
                fields = {"error": outcome.error, "error_node": outcome.node, "error_trace": outcome.trace}
                changes.append(Transition(job_id, "failed", data, fields=fields, runner=runner))
        recorded, given_back = await self._recorded(changes, files)
        states = dict.fromkeys(given_back, "retry")
        for change, stored in zip([c for c in changes if c.job_id not in given_back], recorded, strict=True):
            if not stored and change.job_id in files:
                self.results.delete(files[change.job_id])
            states[change.job_id] = change.state if stored else "cancelled"  # a cancel got there first
        return states

    async def _recorded(self, changes: list[Transition], files: dict[str, str]) -> tuple[list[bool], set[str]]:
        """Write the changes to Redis, trying until it answers, in a task this replica owns: a
        caller that gives up (the scheduler's timeout, or its death) does not take the outcomes
        with it. While Redis is away, results held in memory count against
        NNFABRIC_OUTCOME_BUFFER_BYTES; past it they go to the result store, or, without one, the
        jobs are given back (their state "retry") to run again. Returns (stored or not, for the
        changes kept; the ids given back)."""
        if not changes:
            return [], set()
        try:
            return await self.store.transition_many(changes), set()
        except _REDIS_DOWN:
            pass  # Redis is away: keep the outcomes until it answers
        given_back: set[str] = set()
        kept: list[Transition] = []
        for change in changes:
            size = len(change.result or b"")
            if size and self._held + size > self.settings.outcome_buffer_bytes:
                if not self.settings.has_result_store:
                    log.error("replica of %s: Redis unreachable and %d bytes of results already held; job %s "
                              "will run again", self.spec.name, self._held, change.job_id)  # fmt: skip
                    given_back.add(change.job_id)
                    continue
                try:
                    name = await asyncio.to_thread(self.results.write, change.job_id, change.result or b"")
                except OSError as exc:  # the store is full or gone: the job is given back
                    log.error("replica of %s: cannot keep job %s's result (%s); it will run again",
                              self.spec.name, change.job_id, exc)  # fmt: skip
                    given_back.add(change.job_id)
                    continue
                files[change.job_id] = name
                change.result, change.fields = None, {**change.fields, "result_file": name}
                size = 0
            self._held += size
            kept.append(change)
        held = sum(len(c.result or b"") for c in kept)
        recording = asyncio.ensure_future(
            self._patiently(lambda: self.store.transition_many(kept), "recording outcomes")
        )
        self._recordings.add(recording)

        def forget(done: asyncio.Task[list[bool]]) -> None:
            self._recordings.discard(done)
            self._held -= held

        recording.add_done_callback(forget)
        return await asyncio.shield(recording), given_back

    async def stats(self) -> dict[str, Any]:
        """What this replica has spent: its process's CPU time, the part inside the model's runs,
        and the jobs and batches it ran (benchmarks/cost.py reads it)."""
        times = os.times()
        return {"pid": os.getpid(), "cpu_s": times.user + times.system, "model_cpu_s": self.executor.model_cpu_s,
                "jobs": self.jobs_run, "batches": self.batches_run}  # fmt: skip

    async def check_health(self) -> None:
        """Healthy when the model is loaded (every stage answers); renews this replica's liveness
        in Redis when Redis answers."""
        if self.stuck:
            raise RuntimeError(self.stuck)
        if self.executor.model is None:
            raise RuntimeError("the model is not loaded")
        if self.stages is not None:
            try:
                await self.stages.check()
            except StageLost as exc:
                await self._lost(str(exc))
                raise RuntimeError(self.stuck) from exc
        try:
            await self.store.replica_alive(self.spec.name, self.replica, LIVENESS_S, os.getpid())
        except _REDIS_DOWN as exc:
            # Redis being away is not this replica's fault, and replacing it would lose the
            # outcomes it keeps until Redis answers: healthy, though not counted live meanwhile.
            log.warning("replica of %s: cannot renew its liveness (%s)", self.spec.name, type(exc).__name__)

    async def __del__(self) -> None:
        await self.store.replica_gone(self.spec.name, self.replica)


@contextlib.asynccontextmanager
async def _held(lock: asyncio.Lock) -> AsyncIterator[None]:
    """A lock already acquired, released when the block ends."""
    try:
        yield
    finally:
        lock.release()


def model_app(spec: ModelSpec, settings: Settings) -> Any:
    """One model's Serve application: `spec.replicas` replicas with `spec.gpus` GPUs each, or
    between min_replicas and max_replicas, following the scheduler's batches in flight."""
    scaling: dict[str, Any] = {"num_replicas": spec.replicas}
    if spec.autoscaled:
        # Each replica runs one batch at a time and holds the next; the scheduler keeps up to
        # max_replicas * SLOTS_PER_REPLICA batches in flight while jobs wait, so more than one
        # ongoing request per replica means a batch is waiting: a backlog.
        scaling = {"autoscaling_config": {
            "min_replicas": spec.min_replicas or spec.replicas, "max_replicas": spec.max_replicas,
            "initial_replicas": spec.replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": spec.scale_up_s, "downscale_delay_s": spec.scale_down_s,
            "metrics_interval_s": 1.0, "look_back_period_s": 2.0,
        }}  # fmt: skip
    return ModelReplica.options(  # type: ignore[attr-defined]
        name=spec.deployment, **replica_placement(spec), **scaling
    ).bind(spec.model_dump(), settings.model_dump())


def replica_placement(spec: ModelSpec) -> dict[str, Any]:
    """Where a replica runs. A staged model's replica reserves one placement group with a bundle
    per stage (spread over nodes as the catalog says); the replica itself needs nothing of its
    own and lives in bundle 0, beside stage 0."""
    if not spec.staged:
        return {"ray_actor_options": {"num_gpus": spec.gpus, "num_cpus": 0 if spec.gpus else spec.cpus}}
    bundle = {"GPU": float(spec.gpus)} if spec.gpus else {"CPU": float(spec.cpus)}
    return {
        "ray_actor_options": {"num_gpus": 0, "num_cpus": 0},
        "placement_group_bundles": [dict(bundle) for _ in range(spec.stages)],
        "placement_group_strategy": spec.placement_strategy,
    }


def build_app(args: dict[str, str]) -> Any:
    """Serve config entry point (KubeRay's serveConfigV2): `import_path: services.worker.deployment:build_app`
    with `args: {model: <name>}`; the catalog and Redis come from the NNFABRIC_* environment."""
    settings = Settings()
    spec = Catalog.load(settings.catalog).get(args["model"])
    if spec is None:
        raise ValueError(f"model {args['model']!r} is not in the catalog {settings.catalog}")
    return model_app(spec, settings)


def deploy_catalog(catalog: Catalog, settings: Settings) -> None:
    """Deploy every catalog model as its own Serve application; waits until each is ready."""
    serve.start(proxy_location="Disabled")
    for spec in catalog.models:
        serve.run(model_app(spec, settings), name=spec.deployment, route_prefix=None, blocking=False)
        log.info("deployed %s", spec.deployment)
