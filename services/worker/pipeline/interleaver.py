"""The interleaver on one stage of a pipeline: it hooks only the stage's modules, runs the graph
as far as this stage's events allow, and hands its state on (`export`, `adopt`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from nnfabric.graph.ir import Node
from nnfabric.runtime.interleaver import MISSING, SKIPPED, Interleaver, ModuleEvent

from .plan import StagePlan
from .transfer import DROPPED, POSTPONED, arrived, portable


class StagedInterleaver(Interleaver):
    """The interleaver on one stage: it hooks only the stage's modules, runs the graph as far as
    this stage's events allow, and hands its state on."""

    def __init__(self, *args: Any, plan: StagePlan, index: int, upstream: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.index = index
        self.counts_steps = index == 0
        self.postponed: list[int] = []
        self.live_values: dict[int, Any] = {}  # values computed on this stage, autograd intact
        self.boundary_in: torch.Tensor | None = None  # the hidden state this stage received
        self.boundary_out: torch.Tensor | None = None  # the one it handed on
        self.upstream: Callable[[int, torch.Tensor], None] | None = upstream
        self.device = torch.device("cpu")

    def hooked(self) -> set[ModuleEvent]:
        return {e for e in self.wanted if self.plan.owner(e.path, e.side) == self.index}

    # -- the state --------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        needed = set(self.graph.saves)
        for node in self.nodes:
            if self.values[node.id] is MISSING or self.values[node.id] is POSTPONED:
                needed.update(self.deps[node.id])
        values = [
            portable(v) if i in needed or v is MISSING or v is SKIPPED or v is POSTPONED else DROPPED
            for i, v in enumerate(self.values)
        ]
        return {
            "values": values,
            "threads": [(list(t.nodes), t.pc) for t in self.threads],
            "grad_threads": [(list(t.nodes), t.pc) for t in self.grad_threads],
            "grads": {k: portable(v) for k, v in self._grads.items()},
            "postponed": list(self.postponed),
            "fired": set(self.fired),
            "step": self.step,
            "counts": dict(self.counts),
            "columns": dict(self.columns),
            "last_step": dict(self.last_step),
            "ending": self.ending,
        }

    def adopt(self, state: dict[str, Any], advance: bool = False) -> None:
        """Take over the run's state; `advance`: the run has reached this stage's forward, so what
        needs no event may run here (never mid-backward: the node running then is not done)."""
        self.values = [arrived(v, self.device) for v in state["values"]]
        for thread, (nodes, pc) in zip(self.threads, state["threads"], strict=True):
            thread.nodes, thread.pc = list(nodes), pc
        for thread, (nodes, pc) in zip(self.grad_threads, state["grad_threads"], strict=True):
            thread.nodes, thread.pc = list(nodes), pc
        self._grads = {k: arrived(v, self.device) for k, v in state["grads"].items()}
        self.postponed = list(state["postponed"])
        self.fired = set(state["fired"])
        self.step = state["step"]
        self.counts = dict(state["counts"])
        self.columns = dict(state["columns"])
        self.last_step = dict(state["last_step"])
        self.ending = state["ending"]
        self._retry_postponed()
        if advance and not self.ending:
            # What needs no event runs where its module is (a weight of stage 0 read by a graph
            # whose every event is on a later stage).
            self._advance(self.threads)

    # -- values that wait for a later stage --------------------------------------------------------
    def _here(self, node: Node) -> bool:
        if node.op == "call_module":
            return self.plan.holds(node.args[0], self.index)
        if node.op == "parameter":
            return self.plan.holds(str(node.args[0]).rpartition(".")[0], self.index)
        return True

    def execute(self, node: Node) -> Any:
        waiting = [d for d in self.deps[node.id] if self.values[d] is POSTPONED]
        if waiting or not self._here(node):
            if self.pin[node.id] is None and not self.ending:
                self.postponed.append(node.id)
                return POSTPONED
            module = node.args[0] if not waiting else self.nodes[waiting[0]].args[0]
            raise self._error(node, self._too_far(str(module)))
        value = super().execute(node)
        if self.needs_grad:
            self.live_values[node.id] = value
        return value

    def _too_far(self, module: str) -> str:
        return (
            f"this line needs model.{module}, which lives on another stage of this model's pipeline; "
            "a graph can use a module's weights only when the run has reached that module "
            "(use it on values from earlier layers, not later ones)"
        )

    def _retry_postponed(self) -> None:
        for nid in list(self.postponed):
            node = self.nodes[nid]
            if not self._here(node) or any(self.values[d] is POSTPONED for d in self.deps[nid]):
                if self.ending:
                    raise self._error(node, self._too_far(str(node.args[0])))
                continue
            self.postponed.remove(nid)
            self.values[nid] = MISSING
            self.values[nid] = self.execute(node)

    def finish(self) -> None:
        self.ending = True
        self._retry_postponed()
        super().finish()

    # -- gradients across stages -------------------------------------------------------------------
    def activation(self, nid: int) -> Any:
        return self.live_values.get(nid, MISSING)

    def backward_from(
        self, backward: int, output: torch.Tensor, grad_output: Any, extra: list[torch.Tensor]
    ) -> list[Any]:
        boundary = self.boundary_in
        if boundary is None or not boundary.requires_grad or self.upstream is None:
            return super().backward_from(backward, output, grad_output, extra)
        grads = super().backward_from(backward, output, grad_output, [*extra, boundary])
        if grads and grads[-1] is not None:
            self.upstream(backward, grads[-1])  # the earlier stages' share, with this run's state
        return grads[:-1]

    def backward_upstream(self, backward: int, grad: torch.Tensor) -> None:
        """This stage's share of backward node `backward`, given the gradient of its output."""
        if self.boundary_out is None:
            return
        self.backward_from(backward, self.boundary_out, grad.to(self.boundary_out.device), [])
