"""The replica's side of a pipeline: calling its stages (in this process, or Ray actors) and
driving one run over them, in place of an interleaver.

    pipeline = local_pipeline(directory, tokenizer, 2)   # every stage in this process (tests)
    saved = run_graph(graph, tensors, pipeline)          # exactly as on one device
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from nnfabric.graph.ir import Graph
from nnfabric.runtime.adapters import Batch, CausalLMAdapter
from nnfabric.runtime.decoding import Decoding
from nnfabric.runtime.guards import Budget
from nnfabric.runtime.interleaver import EarlyStop

from .interleaver import StagedInterleaver
from .plan import StagePlan
from .stage import RunSpec, Stage, raise_failure
from .transfer import arrived, portable
from .weights import load_stage, shell_model


class StageLost(Exception):
    """A stage's process is gone: the run cannot go on, and the replica must be replaced whole."""


class StageLink(Protocol):
    """A stage as the replica calls it: in this process, or a Ray actor."""

    def begin(self, spec: RunSpec) -> Any: ...  # pending: `result` gives the reply (stages start at once)
    def forward_after(self, kwargs: dict[str, Any], previous: Any) -> Any: ...
    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]: ...
    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]: ...
    def end(self) -> Any: ...
    def result(self, reply: Any) -> dict[str, Any]: ...


class LocalLink:
    """A stage in this process; what crosses is copied, as it would be between processes."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def begin(self, spec: RunSpec) -> dict[str, Any]:
        return self.stage.begin(copy.deepcopy(spec))

    def forward_after(self, kwargs: dict[str, Any], previous: Any) -> Any:
        return copy.deepcopy(self.stage.forward_after(copy.deepcopy(kwargs), copy.deepcopy(previous)))

    def result(self, reply: Any) -> dict[str, Any]:
        return dict(reply)

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        return copy.deepcopy(self.stage.finish(copy.deepcopy(state), copy.deepcopy(final_output)))

    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]:
        return copy.deepcopy(self.stage.backward(copy.deepcopy(state), backward, copy.deepcopy(grad)))

    def end(self) -> dict[str, Any]:
        return self.stage.end()


def local_pipeline(source: str, tokenizer: Any, count: int, dtype: torch.dtype = torch.float32,
                   ranges: list[tuple[int, int]] | None = None) -> Pipeline:  # fmt: skip
    """A staged model whose stages all live in this process (tests, and trying a split)."""
    shell = shell_model(source, dtype)
    plan = StagePlan.of(shell, ranges) if ranges else StagePlan.balanced(shell, count)
    stages = [Stage(load_stage(source, plan, i, dtype), plan, i) for i in range(plan.count)]
    for earlier, later in itertools.pairwise(stages):
        later.previous = LocalLink(earlier)
    return Pipeline(shell, tokenizer, plan, [LocalLink(s) for s in stages])


class Pipeline:
    """A staged model as `run_graph` sees it: an adapter whose runs go through the stages."""

    def __init__(self, shell: Any, tokenizer: Any, plan: StagePlan, links: list[Any]) -> None:
        self.root = shell
        self.plan = plan
        self.links = links
        # The shell has no weights: inputs stay on the host, and each stage moves them to its device.
        self.lm = CausalLMAdapter(shell, tokenizer, device=torch.device("cpu"))

    def batch(self, invokes: list[tuple[list[Any] | None, dict[str, Any]]]) -> Batch:
        return self.lm.batch(invokes)

    def forward(self, batch: Batch) -> Any:
        return self.lm.forward(batch)

    def generate(
        self, batch: Batch, decodings: list[Decoding], on_end: Callable[[int, int], None] | None = None
    ) -> Any:
        return self.lm.generate(batch, decodings, on_end)

    def interleaver(
        self,
        graph: Graph,
        tensors: dict[str, torch.Tensor],
        rows: list[tuple[int, int] | None],
        size: int,
        budget: Budget | None,
        imports: dict[int, Any] | None,
        isolated: bool,
        attention_weights: bool = False,
    ) -> StagedRun:
        return StagedRun(self, graph, tensors, rows, size, budget, imports, isolated, attention_weights)


class StagedRun:
    """One run over the stages, in place of an `Interleaver` (the same `call`/`saved` surface)."""

    def __init__(self, pipeline: Pipeline, graph: Graph, tensors: dict[str, torch.Tensor],
                 rows: list[tuple[int, int] | None], size: int, budget: Budget | None,
                 imports: dict[int, Any] | None, isolated: bool, attention_weights: bool) -> None:  # fmt: skip
        self.pipeline = pipeline
        self.graph = graph
        self.budget = budget
        left = None if budget is None or budget.deadline is None else budget.deadline - time.monotonic()
        self.spec = RunSpec(graph, tensors, rows, size, left, imports, isolated, graph.kind == "generate",
                            attention_weights)  # fmt: skip
        # The state starts here, from an interleaver that plans but never hooks.
        self.state = StagedInterleaver(
            graph, tensors, pipeline.root, rows, size, budget, imports, isolated, plan=pipeline.plan, index=0
        ).export()
        if graph.kind == "generate":
            self.state["step"] = -1
        self.columns: dict[int, int] = {}
        self.last_step: dict[int, int] = {}
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StagedRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        links = self.pipeline.links
        with contextlib.suppress(Exception):
            for link, pending in zip(links, [link.end() for link in links], strict=True):
                link.result(pending)

    def call(self, run_model: Callable[[], Any]) -> Any:
        links = self.pipeline.links
        for link, pending in zip(links, [link.begin(self.spec) for link in links], strict=True):
            raise_failure(link.result(pending))
        shell = self.pipeline.root

        # Hugging Face's own loop (generate) drives the stages; it reads the forward's signature
        # to choose what to pass, so the stand-in has the model's.
        @functools.wraps(shell.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(*args, **kwargs)

        shell.forward = forward
        output = None
        try:
            with contextlib.suppress(EarlyStop):
                output = run_model()
        finally:
            del shell.forward
        final = output if self.graph.kind == "generate" else None
        self._sync()
        reply = self.pipeline.links[-1].finish(self.state, portable(final))
        raise_failure(reply)
        self._saved = arrived(reply["saved"], torch.device("cpu"))
        return output

    def _sync(self) -> None:
        self.state["last_step"].update(self.last_step)
        self.state["columns"].update(self.columns)

    def saved(self) -> dict[int, Any]:
        return self._saved

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.budget is not None:
            self.budget.check_time()
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        kwargs.pop("return_dict", None)
        if args:
            kwargs["input_ids"] = args[0]
        self._sync()
        # Each stage's reply goes straight to the next stage (a Ray object reference: the hidden
        # state and the graph's values move stage to stage, not through this process).
        links = self.pipeline.links
        pending: Any = {"state": self.state}
        for link in links:
            pending = link.forward_after(kwargs, pending)
        reply = links[-1].result(pending)
        raise_failure(reply)
        self.state = reply["state"]
        if reply.get("stopped"):
            raise EarlyStop()
        output = arrived(reply["output"], torch.device("cpu"))
        if cache is not None:
            # Hugging Face's loop reads the cache's length for positions: a cache of zero-width keys
            # with one entry per token tells it (the real caches stay on the stages).
            ids = kwargs["input_ids"]
            empty = torch.zeros(ids.shape[0], 1, ids.shape[1], 0)
            cache.update(empty, empty, 0)
            output["past_key_values"] = cache
        return output
