"""Runs a batch of jobs on one loaded model, under the catalog's limits.

    executor = BatchExecutor(spec, hf_model, tokenizer)
    outcomes = executor.run([(job_id, payload_bytes), ...])   # {job_id: Outcome}

Compatible jobs (plain traces whose every invoke has inputs and that take no gradients) are
merged into one graph and one forward pass; each job's reads and writes still touch only its
own rows. A session (several traces in one job) runs alone, its traces in order. If a merged run fails, its jobs run one by one, so one job's error never reaches
its batch-mates. Nothing of a job outlives it on the model: hooks are removed, grads cleared.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from nnfabric.errors import InterventionError
from nnfabric.graph.codec import decode_request
from nnfabric.graph.ir import Graph, Invoke, Node, relabel
from nnfabric.graph.tree import ModuleTree
from nnfabric.graph.validate import GraphError
from nnfabric.runtime.adapters import CausalLMAdapter
from nnfabric.runtime.execute import run_graph, run_session
from nnfabric.runtime.guards import Budget
from nnfabric.runtime.source import module_operations
from nnfabric.runtime.wire import load_blob, pack_saved, saved_nbytes

from ..common.catalog import ModelSpec, limits_for
from ..common.settings import Settings

_UNMERGEABLE = {"backward", "grad", "set_grad", "stop"}


@dataclass
class Outcome:
    result: bytes | None = None
    error: str | None = None
    node: int | None = None
    seconds: float = 0.0
    trace: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchExecutor:
    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, settings: Settings | None = None) -> None:
        self.spec = spec
        self.model = model
        self.adapter = CausalLMAdapter(model, tokenizer)
        self.tree = ModuleTree.from_module(model, operations=module_operations)
        self.paths = self.tree.paths()
        self.limits = limits_for(spec, settings or Settings())
        self.running: list[str] = []  # the jobs of the run in progress
        self.finished: dict[str, Outcome] = {}  # outcomes of the current batch so far

    def decode(self, payload: bytes) -> tuple[list[Graph], dict[str, torch.Tensor]]:
        """The same validation as the gateway's (one function, the same limits)."""
        graphs, blob = decode_request(payload, self.limits, self.paths)
        return graphs, load_blob(blob)

    def run(self, jobs: list[tuple[str, bytes]]) -> dict[str, Outcome]:
        """Every job's outcome. Progress is visible meanwhile (`running`, `finished`), so a
        watchdog that gives up on a stuck run knows whose it is and what is done."""
        outcomes: dict[str, Outcome] = {}
        self.finished = outcomes
        self.running = []
        decoded: list[tuple[str, list[Graph], dict[str, torch.Tensor]]] = []
        for job_id, payload in jobs:
            try:
                graphs, tensors = self.decode(payload)
            except GraphError as exc:
                outcomes[job_id] = Outcome(error=f"invalid graph: {exc}", node=exc.node, trace=exc.trace)
                continue
            except Exception as exc:  # bytes the validator passed but the loader refused: this job's alone
                outcomes[job_id] = Outcome(error=f"invalid tensors: {type(exc).__name__}: {exc}")
                continue
            decoded.append((job_id, graphs, tensors))
        mergeable = [(job_id, gs[0], t) for job_id, gs, t in decoded if len(gs) == 1 and _mergeable(gs[0])]
        if len(mergeable) > 1:
            self.running = [job_id for job_id, _, _ in mergeable]
            outcomes.update(self._run_merged(mergeable))
        for job_id, graphs, tensors in decoded:
            if job_id not in outcomes:
                self.running = [job_id]
                outcomes[job_id] = self._run_one(graphs, tensors)
        self.running = []
        return outcomes

    def _budget(self, start: float) -> Budget:
        return Budget(deadline=start + self.spec.limits.timeout_s)

    def _run_one(self, graphs: list[Graph], tensors: dict[str, torch.Tensor]) -> Outcome:
        start = time.monotonic()
        try:
            seed = graphs[0].options.get("seed") if len(graphs) == 1 else None
            with private_rng(seed if isinstance(seed, int) else None):
                saved = run_session(graphs, tensors, self.adapter, self._budget(start))
            return self._finish(saved, len(graphs) > 1, start)
        except InterventionError as exc:
            return Outcome(error=exc.reason, node=exc.node, seconds=time.monotonic() - start, trace=exc.trace)
        except torch.OutOfMemoryError:
            return Outcome(
                error="out of memory: save less, or use fewer or shorter prompts", seconds=time.monotonic() - start
            )
        except Exception as exc:  # a job's failure must never take the replica down
            return Outcome(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - start)
        finally:
            self._clean()

    def _finish(self, saved: list[dict[int, Any]], session: bool, start: float) -> Outcome:
        limit = self.spec.limits.max_saved_bytes
        size = saved_nbytes(saved)  # tensors first: cheap, and it spares packing a huge one
        if size <= limit:
            packed = pack_saved(saved, session)
            size = len(packed)  # every saved value counts: lists and numbers too
            if size <= limit:
                return Outcome(result=packed, seconds=time.monotonic() - start)
        return Outcome(
            error=f"saved values take {size} bytes, over this model's limit of {limit}",
            seconds=time.monotonic() - start,
        )

    def _run_merged(self, jobs: list[tuple[str, Graph, dict[str, torch.Tensor]]]) -> dict[str, Outcome]:
        merged, tensors, offsets = merge_graphs([(g, t) for _, g, t in jobs])
        start = time.monotonic()
        try:
            with private_rng(None):
                saved = run_graph(merged, tensors, self.adapter, self._budget(start), isolated=True)
        except Exception:
            self._clean()
            # Someone's job failed, or needs a run of its own (NeedsSolo): run each alone, so a
            # failure stays with its owner.
            alone: dict[str, Outcome] = {}
            for job_id, graph, t in jobs:
                self.running = [job_id]
                alone[job_id] = self.finished[job_id] = self._run_one([graph], t)
            return alone
        self._clean()
        outcomes = {}
        for (job_id, graph, _), offset in zip(jobs, offsets, strict=True):
            own = {nid: saved[nid + offset] for nid in graph.saves if nid + offset in saved}
            try:
                outcomes[job_id] = self._finish([own], False, start)
            except Exception as exc:  # e.g. a saved value that cannot be encoded: its owner's failure
                outcomes[job_id] = Outcome(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - start)
        return outcomes

    def _clean(self) -> None:
        for parameter in self.model.parameters():
            parameter.grad = None


def _mergeable(graph: Graph) -> bool:
    """May share a forward pass: a plain trace, every invoke naming its own rows (an invoke
    without inputs is the whole batch), no gradients or early stop, no options (a seed)."""
    return (
        graph.kind == "trace"
        and all(inv.args is not None for inv in graph.invokes)
        and not graph.options
        and not any(node.op in _UNMERGEABLE for node in graph.nodes)
    )


@contextlib.contextmanager
def private_rng(seed: int | None) -> Iterator[None]:
    """A job's own random stream: seeded by the job (or at random), and the replica's global
    generator is as it was afterwards, so no job can steer or predict another's randomness."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed if seed is not None else secrets.randbits(63))
        yield


def merge_graphs(
    parts: list[tuple[Graph, dict[str, torch.Tensor]]],
) -> tuple[Graph, dict[str, torch.Tensor], list[int]]:
    """Concatenate graphs into one: node ids, invoke indices and tensor names are offset."""
    merged = Graph(kind="trace")
    tensors: dict[str, torch.Tensor] = {}
    offsets = []
    for index, (graph, own_tensors) in enumerate(parts):
        node_offset, invoke_offset, prefix = len(merged.nodes), len(merged.invokes), f"j{index}_"
        offsets.append(node_offset)
        tensors.update({prefix + name: t for name, t in own_tensors.items()})
        for inv in graph.invokes:
            merged.invokes.append(
                Invoke(
                    args=None if inv.args is None else [_shift(a, node_offset, prefix) for a in inv.args],
                    kwargs={k: _shift(v, node_offset, prefix) for k, v in inv.kwargs.items()},
                )
            )
        for node in graph.nodes:
            merged.add(
                Node(
                    op=node.op,
                    args=[_shift(a, node_offset, prefix) for a in node.args],
                    kwargs={k: _shift(v, node_offset, prefix) for k, v in node.kwargs.items()},
                    invoke=node.invoke + invoke_offset,
                    line=node.line,
                    optional=node.optional,
                    unordered=node.unordered,
                )
            )
        merged.saves.extend(s + node_offset for s in graph.saves)
    return merged, tensors, offsets


def _shift(value: Any, offset: int, prefix: str) -> Any:
    return relabel(value, lambda node: node + offset, prefix)
