"""One stage's share of every run: begin, forward (handing the hidden state on), finish,
backward, end. Every method returns a reply dict rather than raising, so a failure crosses a
process boundary as the user's line, not as a traceback.

    stage = Stage(load_stage(directory, plan, 1), plan, 1)
    stage.begin(spec); reply = stage.forward_after(kwargs, previous_reply)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from nnfabric.errors import InterventionError
from nnfabric.graph.ir import Graph, SourceLine
from nnfabric.runtime.execute import eager_attention
from nnfabric.runtime.guards import Budget, NeedsSolo
from nnfabric.runtime.interleaver import EarlyStop

from .interleaver import StagedInterleaver
from .plan import StagePlan
from .transfer import arrived, portable


class _Handoff(Exception):
    def __init__(self, hidden: torch.Tensor, collected: dict[str, Any] | None) -> None:
        super().__init__("handoff")
        self.hidden = hidden
        self.collected = collected


def _collector() -> dict[str, Any] | None:
    """What transformers is collecting for the model's output in this forward (attention weights,
    hidden states of every layer): each stage collects its own layers', and they travel on."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers: nothing collected this way
        return None
    found = _active_collector.get()
    return found if isinstance(found, dict) else None


@dataclass
class RunSpec:
    """What every stage needs for a run, sent once per run."""

    graph: Graph
    tensors: dict[str, torch.Tensor]
    rows: list[tuple[int, int] | None]
    size: int
    seconds_left: float | None
    imports: dict[int, Any] | None
    isolated: bool
    cached: bool  # generation: each stage keeps a key/value cache for its layers
    attention_weights: bool = False


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, NeedsSolo):
        return {"solo": str(exc)}
    if isinstance(exc, InterventionError):
        line = exc.line
        return {"error": exc.reason, "node": exc.node, "line": None if line is None else line.__dict__}
    return {"error": f"{type(exc).__name__}: {exc}", "node": None, "line": None}


def raise_failure(reply: dict[str, Any]) -> None:
    """Re-raise a stage's failure in the replica, at the user's line."""
    if "solo" in reply:
        raise NeedsSolo(reply["solo"])
    if "error" in reply:
        line = reply.get("line")
        raise InterventionError(reply["error"], None if line is None else SourceLine(**line), reply.get("node"))


_NO_RUN = {"error": "this stage has no run in progress (the replica restarted it)"}


class Stage:
    """One stage's model and its share of the run in progress. Every method returns a reply
    dict (the state, and "error" when the run failed here) rather than raising, so a failure
    crosses a process boundary as the user's line, not as a traceback."""

    def __init__(self, model: Any, plan: StagePlan, index: int) -> None:
        self.model = model
        self.plan = plan
        self.index = index
        self.previous: Any = None  # the stage before this one (a link), for gradients
        self.run: StagedInterleaver | None = None
        self.cache: Any = None
        self.output: Any = None
        self.spec: RunSpec | None = None
        params = [p for p in model.parameters() if p.device.type != "meta"]
        self.device = params[0].device if params else torch.device("cpu")
        start, stop = plan.ranges[index]
        blocks = model.get_submodule(plan.layers)
        self.first = blocks[start]
        self.next = blocks[stop] if stop < len(blocks) else None

    def begin(self, spec: RunSpec) -> dict[str, Any]:
        self.end()
        try:
            budget = None if spec.seconds_left is None else Budget(deadline=time.monotonic() + spec.seconds_left)
            tensors = {k: v.to(self.device) for k, v in spec.tensors.items()}
            run = StagedInterleaver(
                spec.graph, tensors, self.model, spec.rows, spec.size, budget, spec.imports, spec.isolated,
                plan=self.plan, index=self.index, upstream=self._upstream if self.index > 0 else None,
            )  # fmt: skip
            run.device = self.device
            run.__enter__()
            self.run, self.spec = run, spec
            if spec.cached:
                self.cache = _stage_cache(self.model, self.plan, self.index)
            return {}
        except Exception as exc:
            return _failure(exc)

    def forward(self, kwargs: dict[str, Any], state: dict[str, Any], hidden: torch.Tensor | None) -> dict[str, Any]:
        run, spec = self.run, self.spec
        if run is None or spec is None:
            return dict(_NO_RUN)
        handles = []
        try:
            with torch.enable_grad() if run.needs_grad else torch.no_grad():
                run.adopt(state, advance=True)  # what waited for this stage runs now, under the run's grad mode
            if hidden is not None:
                received = arrived(hidden, self.device)
                if run.needs_grad:
                    received = received.detach().requires_grad_(True)
                run.boundary_in = received
                inject = _inject(received, state.get("collected"))
                handles.append(self.first.register_forward_pre_hook(inject, with_kwargs=True, prepend=True))
            if self.next is not None:
                handles.append(self.next.register_forward_pre_hook(_hand_off, with_kwargs=True, prepend=True))
            args = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if self.cache is not None:
                args["cache"] = self.cache
            grad = torch.enable_grad() if run.needs_grad else torch.no_grad()
            reply: dict[str, Any] = {}
            with grad, eager_attention(self.model, spec.attention_weights):
                try:
                    output = self.model(**args)
                except _Handoff as handoff:
                    run.boundary_out = handoff.hidden
                    reply["hidden"] = portable(handoff.hidden)
                    reply["collected"] = portable(handoff.collected)
                except EarlyStop:
                    reply["stopped"] = True
                else:
                    self.output = output
                    reply["output"] = _output_portable(output)
            reply["state"] = run.export()
            if reply.get("collected"):
                reply["state"]["collected"] = reply.pop("collected")
            return reply
        except Exception as exc:
            return _failure(exc)
        finally:
            for handle in reversed(handles):
                handle.remove()

    def forward_after(self, kwargs: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
        """This stage's forward, given the previous stage's reply (handed over stage to stage,
        never through the replica); a failure or an early stop passes through unchanged."""
        if "error" in previous or "solo" in previous or previous.get("stopped"):
            return previous
        return self.forward(kwargs, previous["state"], arrived(previous.get("hidden"), self.device))

    def finish(self, state: dict[str, Any], final_output: Any) -> dict[str, Any]:
        """The end of the run (on the last stage): what waited for it runs; the saved values."""
        run = self.run
        if run is None:
            return dict(_NO_RUN)
        try:
            run.adopt(state)
            run.final_output = self.output if final_output is None else arrived(final_output, self.device)
            with torch.enable_grad() if run.needs_grad else torch.no_grad():
                run.finish()
            return {"saved": portable(run.saved())}
        except Exception as exc:
            return _failure(exc)

    def backward(self, state: dict[str, Any], backward: int, grad: Any) -> dict[str, Any]:
        run = self.run
        if run is None:
            return dict(_NO_RUN)
        try:
            run.adopt(state)
            with torch.enable_grad():
                run.backward_upstream(backward, arrived(grad, self.device))
            return {"state": run.export()}
        except Exception as exc:
            return _failure(exc)

    def _upstream(self, backward: int, grad: torch.Tensor) -> None:
        run = self.run
        assert run is not None and self.previous is not None
        reply = self.previous.backward(run.export(), backward, portable(grad))
        raise_failure(reply)
        run.adopt(reply["state"])

    def end(self) -> dict[str, Any]:
        if self.run is not None:
            self.run.__exit__()
        self.run = self.spec = self.cache = self.output = None
        for param in self.model.parameters():
            param.grad = None
        return {}


def _inject(hidden: torch.Tensor, earlier: dict[str, Any] | None) -> Callable[..., Any]:
    def hook(module: Any, args: Any, kwargs: Any) -> Any:
        collecting = _collector()
        if earlier and collecting is not None:
            # Earlier stages' layers come first in the model's output (their attention weights,
            # hidden states): as if one forward had collected them all.
            for key, values in earlier.items():
                if key in collecting and isinstance(values, list):
                    collecting[key][:0] = arrived(values, hidden.device)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def _hand_off(module: Any, args: Any, kwargs: Any) -> Any:
    collecting = _collector()
    kept = {k: list(v) for k, v in collecting.items() if isinstance(v, list)} if collecting else None
    raise _Handoff(args[0] if args else kwargs["hidden_states"], kept)


def _output_portable(output: Any) -> Any:
    """The last stage's output for the replica (its key/value cache stays on the stage)."""
    if isinstance(output, dict) and "past_key_values" in output:
        output = copy.copy(output)
        output["past_key_values"] = None
    return portable(output)


def _stage_cache(model: Any, plan: StagePlan, index: int) -> Any:
    """A key/value cache for this stage's layers; questions about the cache's length (masks,
    positions) are answered from the stage's first layer, since the others stay empty here."""
    from transformers import DynamicCache

    first, stop = plan.ranges[index]

    class StageCache(DynamicCache):
        def _own(self, layer_idx: int | None) -> int:
            return layer_idx if layer_idx is not None and first <= layer_idx < stop else first

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return int(super().get_seq_length(self._own(layer_idx)))

        def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> Any:
            return super().get_mask_sizes(query_length, self._own(layer_idx))

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return int(super().get_query_offset(self._own(layer_idx)))

    return StageCache(config=model.config)
