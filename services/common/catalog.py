"""The model catalog: the one place an operator declares what the fabric serves.

    catalog = Catalog.load("catalog.yaml")
    spec = catalog.get("gpt2")            # name, source, dtype, gpus, replicas, limits

YAML:
    models:
      - name: gpt2
        source: openai-community/gpt2      # a repo id, a local directory, or a .gguf file
        dtype: float32
        gpus: 0                            # GPUs per replica (the model is sharded over them)
        replicas: 1                        # or, to follow the queue: min_replicas / max_replicas
        limits: {max_batch: 8, max_new_tokens: 256, max_saved_bytes: 268435456, timeout_s: 120}
      - name: huge
        source: /models/huge                # a model larger than one node: pipeline stages
        stages: 4                           # each replica: a placement group of 4 bundles
        gpus: 1                             # per stage (at most 1)
        placement_strategy: STRICT_SPREAD   # one stage per node
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from nnfabric.graph.validate import Limits
from pydantic import BaseModel, Field, model_validator

from .settings import Settings

_FABRIC = Limits()  # the one set of defaults for what a job may send


class ModelLimits(BaseModel):
    max_batch: int = Field(8, ge=1, description="jobs packed into one forward pass")
    max_new_tokens: int = Field(_FABRIC.max_new_tokens, ge=1)
    max_saved_bytes: int = Field(256 << 20, ge=1, description="bytes of saved values one job may return")
    timeout_s: float = Field(120.0, gt=0, description="execution time of one job")
    max_nodes: int = Field(_FABRIC.max_nodes, ge=1)
    max_tensor_bytes: int = Field(_FABRIC.max_tensor_bytes, ge=0, description="bytes of tensors a job may send")
    max_traces: int = Field(_FABRIC.max_traces, ge=1, description="traces in one session")


class ModelSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: str
    tokenizer: str | None = None
    dtype: str = "float32"
    gpus: int = Field(0, ge=0)
    cpus: float = Field(1.0, gt=0, description="CPUs per replica when it has no GPU")
    replicas: int = Field(1, ge=1, description="replicas at start (and always, without max_replicas)")
    # Replicas follow the queue between these (Serve's autoscaling on the scheduler's batches in
    # flight, which it sends only while jobs wait): up after scale_up_s of backlog, down after
    # scale_down_s idle. Live replicas are never restarted to scale.
    min_replicas: int | None = Field(None, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    scale_up_s: float = Field(5.0, ge=0)
    scale_down_s: float = Field(60.0, ge=0)
    # A model larger than one node: split into `stages` pipeline stages, each on its own bundle
    # of the replica's placement group (`gpus`/`cpus` are then per stage), holding a contiguous
    # range of layers: `stage_layers` ([start, stop) per stage), or balanced by parameter count.
    stages: int = Field(1, ge=1, le=64)
    stage_layers: list[tuple[int, int]] | None = None
    placement_strategy: Literal["SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"] = Field(
        "SPREAD", description="how a staged replica's bundles spread over nodes (Ray placement group strategy)"
    )
    # On GPUs: the weights are sharded over the replica's `gpus` by accelerate, each GPU taking at
    # most this share of its memory (the rest holds activations, caches and batch-mates' values);
    # with `offload`, layers that do not fit go to the CPU's memory (slower, but it runs).
    gpu_memory_fraction: float = Field(0.85, gt=0, le=1)
    offload: bool = False
    limits: ModelLimits = ModelLimits()  # type: ignore[call-arg]

    @model_validator(mode="after")
    def _replica_range(self) -> ModelSpec:
        low, high = self.min_replicas or self.replicas, self.max_replicas or self.replicas
        if not low <= high:
            raise ValueError(f"min_replicas ({low}) is above max_replicas ({high})")
        if self.max_replicas is not None and not low <= self.replicas <= high:
            self.replicas = min(max(self.replicas, low), high)
        return self

    @model_validator(mode="after")
    def _stage_layers(self) -> ModelSpec:
        if self.stage_layers is not None:
            if len(self.stage_layers) != self.stages:
                raise ValueError(f"stage_layers has {len(self.stage_layers)} ranges for {self.stages} stages")
            expected = 0
            for start, stop in self.stage_layers:
                if start != expected or stop <= start:
                    raise ValueError(f"stage_layers must be contiguous, non-empty ranges from 0: {self.stage_layers}")
                expected = stop
        return self

    @model_validator(mode="after")
    def _one_gpu_per_stage(self) -> ModelSpec:
        if self.stages > 1 and self.gpus > 1:
            # A stage's layers would all sit on its first GPU (accelerate across one stage's GPUs
            # is not wired): refused rather than reserving GPUs it would not use.
            raise ValueError(f"a staged model takes at most 1 GPU per stage; use more stages (got gpus: {self.gpus})")
        return self

    @property
    def staged(self) -> bool:
        return self.stages > 1

    @property
    def deployment(self) -> str:
        return f"model-{self.name}"

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > (self.min_replicas or self.replicas)

    @property
    def most_replicas(self) -> int:
        """The most replicas this model may have at once (what the scheduler keeps busy)."""
        return self.max_replicas or self.replicas

    @property
    def most_in_flight(self) -> int:
        """Batches the scheduler may have dispatched at once: each replica runs one and holds the
        next, its payloads already fetched and decoded, so it never waits idle for a dispatch."""
        return self.most_replicas * SLOTS_PER_REPLICA


SLOTS_PER_REPLICA = 2  # a replica's batches in flight: the one running and the next


class Catalog(BaseModel):
    models: list[ModelSpec]

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        data = yaml.safe_load(Path(path).read_text())
        return cls.model_validate(data)

    def get(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if spec.name == name or spec.source == name:
                return spec
        return None


def limits_for(spec: ModelSpec, settings: Settings) -> Limits:
    """What one job for `spec` may send: the gateway checks it and the worker checks it again
    with the very same values, so what the gateway accepts the worker loads."""
    return Limits(
        max_nodes=spec.limits.max_nodes,
        max_tensor_bytes=spec.limits.max_tensor_bytes,
        max_new_tokens=spec.limits.max_new_tokens,
        max_traces=spec.limits.max_traces,
        max_envelope_bytes=settings.max_envelope_bytes,
    )
