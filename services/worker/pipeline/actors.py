"""A model split into pipeline stages over Ray: one stage actor per bundle of the replica's
placement group, each holding only its layers.

    pipeline, stages = start_stages(spec, source, tokenizer)   # inside a Serve replica
    executor = BatchExecutor(spec, pipeline.root, tokenizer, settings, adapter=pipeline)
    await stages.check()                                        # every stage answers, or StageLost

Serve reserves the placement group (`placement_group_bundles`, one bundle per stage) with the
replica; the replica actor lives in bundle 0 beside stage 0. Stage actors are owned by the
replica, so when Serve replaces a replica its stages go with it, and a replica whose stage died
reports itself unhealthy so that Serve replaces it whole.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ...common.catalog import ModelSpec
from ..loader import dtype_named
from .links import Pipeline, StageLost
from .plan import StagePlan
from .stage import RunSpec, Stage
from .weights import load_stage, shell_model

_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class StageActor:
    """One stage of one replica's model, in a process of its own (on its bundle's node)."""

    def __init__(self, source: str, plan: dict[str, Any], index: int, dtype: str) -> None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
        parsed = StagePlan.from_json(plan)
        self.stage = Stage(load_stage(source, parsed, index, dtype_named(dtype), device), parsed, index)

    def where(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def connect(self, previous: Any) -> None:
        self.stage.previous = RayLink(previous, 0)

    def begin(self, spec: RunSpec) -> dict[str, Any]:
        return self.stage.begin(spec)

    def forward_after(self, kwargs: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        return self.stage.forward_after(kwargs, previous)

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        return self.stage.finish(state, final_output)

    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]:
        return self.stage.backward(state, backward, grad)

    def end(self) -> dict[str, Any]:
        return self.stage.end()

    def ping(self) -> bool:
        return True


class RayLink:
    """A stage actor as the replica (or the next stage) calls it: a stage that died is StageLost."""

    def __init__(self, actor: Any, index: int) -> None:
        self.actor = actor
        self.index = index
        self.chain: list[RayLink] = []  # every stage of the pipeline, to name the one that died

    def _call(self, method: str, *args: Any) -> dict[str, Any]:
        return self.result(getattr(self.actor, method).remote(*args))

    def result(self, reply: Any) -> dict[str, Any]:
        """The reply behind a reference (a chain of stages' forwards ends here)."""
        try:
            found: dict[str, Any] = ray.get(reply)
        except _LOST as exc:
            raise StageLost(f"{self._which(exc)} of this model's pipeline was lost ({type(exc).__name__})") from exc
        return found

    def _which(self, exc: BaseException) -> str:
        """The stage that died (a chained call fails at the last stage, whichever one died)."""
        dead = getattr(exc, "actor_id", None)
        for link in self.chain:
            if dead is not None and link.actor._actor_id.hex() == dead:
                return f"stage {link.index}"
        return f"stage {self.index}" if dead is None or not self.chain else "a stage"

    def forward_after(self, kwargs: dict[str, Any], previous: Any) -> Any:
        """This stage's forward on the previous stage's reply, left as a reference: Ray hands the
        reply from stage to stage directly."""
        return self.actor.forward_after.remote(kwargs, previous)

    def begin(self, spec: RunSpec) -> Any:
        return self.actor.begin.remote(spec)

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        return self._call("finish", state, final_output)

    def backward(self, state: dict[str, Any], backward: int, grad: torch.Tensor) -> dict[str, Any]:
        return self._call("backward", state, backward, grad)

    def end(self) -> Any:
        return self.actor.end.remote()


class Stages:
    """The stage actors of one replica."""

    def __init__(self, actors: list[Any], places: list[dict[str, Any]]) -> None:
        self.actors = actors
        self.places = places  # each stage's process id and node

    async def check(self, timeout_s: float = 10.0) -> None:
        """Every stage answers (its process is alive); else StageLost, naming the stage."""
        for index, actor in enumerate(self.actors):
            try:
                await asyncio.wait_for(actor.ping.remote(), timeout_s)
            except _LOST as exc:
                raise StageLost(f"stage {index} of this model's pipeline was lost ({type(exc).__name__})") from exc
            except TimeoutError as exc:
                raise StageLost(f"stage {index} of this model's pipeline has not answered for {timeout_s:.0f} s") from exc


def start_stages(spec: ModelSpec, source: str, tokenizer: Any) -> tuple[Pipeline, Stages]:
    """Start one stage actor per bundle of this replica's placement group; each loads its layers
    (in parallel). Returns the pipeline the executor runs, and the actors."""
    dtype = dtype_named(spec.dtype)
    shell = shell_model(source, dtype)
    plan = (
        StagePlan.of(shell, [(int(a), int(b)) for a, b in spec.stage_layers])
        if spec.stage_layers
        else StagePlan.balanced(shell, spec.stages)
    )
    group = get_current_placement_group()
    actors = []
    for index in range(plan.count):
        # Two threads: a health ping is answered while a forward runs.
        options: dict[str, Any] = {"num_cpus": 0 if spec.gpus else spec.cpus, "num_gpus": spec.gpus,
                                   "max_concurrency": 2}  # fmt: skip
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index
            )
        remote = ray.remote(StageActor).options(**options)
        actors.append(remote.remote(source, plan.to_json(), index, spec.dtype))
    places = ray.get([actor.where.remote() for actor in actors])
    ray.get([later.connect.remote(earlier) for earlier, later in itertools.pairwise(actors)])
    links = [RayLink(actor, index) for index, actor in enumerate(actors)]
    for link in links:
        link.chain = links
    return Pipeline(shell, tokenizer, plan, links), Stages(actors, places)
