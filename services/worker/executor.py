"""Runs a batch of jobs on one loaded model, under the catalog's limits.

    executor = BatchExecutor(spec, hf_model, tokenizer)
    outcomes = executor.run([(job_id, payload_bytes), ...])   # {job_id: Outcome}

Compatible jobs (plain traces, or generations with their own decoding settings, whose every
invoke has inputs, that take no gradients, and whose prompts have one width) are merged into
one graph and one forward pass (or one `generate`); each job's reads and writes still touch
only its own rows. A session (several traces in one job) runs alone, its traces in order. If
a merged run fails, its jobs run one by one, so one job's error never reaches its batch-mates.
Nothing of a job outlives it on the model: hooks are removed, grads cleared.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from nnfabric.errors import InterventionError
from nnfabric.graph.codec import decode_request
from nnfabric.graph.ir import Graph, Node, TensorRef
from nnfabric.graph.leaves import map_leaves
from nnfabric.graph.merging import job_prefix, merge
from nnfabric.graph.tree import ModuleTree, split_source
from nnfabric.graph.validate import GraphError
from nnfabric.runtime.adapters import CausalLMAdapter
from nnfabric.runtime.decoding import DECODING_OPTIONS
from nnfabric.runtime.devices import to_host
from nnfabric.runtime.execute import StagedAdapter, reads_attention_weights, run_graph, run_session
from nnfabric.runtime.guards import Budget, NeedsSolo
from nnfabric.runtime.source import module_operations
from nnfabric.runtime.wire import load_blob, pack_saved, saved_nbytes

from ..common.catalog import ModelSpec, limits_for
from ..common.settings import Settings
from .generation import Generation, Member
from .pipeline.links import StageLost

_UNMERGEABLE = {"backward", "grad", "set_grad", "stop"}
_RANDOM = ("rand", "multinomial", "bernoulli", "normal", "dropout", "poisson")
Decoded = tuple[str, list[Graph], dict[str, torch.Tensor]]  # a job ready to run: id, traces, tensors


@dataclass
class Outcome:
    result: bytes | None = None
    error: str | None = None
    node: int | None = None
    seconds: float = 0.0
    trace: int | None = None
    shared: int = 1  # jobs in the forward pass (or generate) it ran in

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchExecutor:
    def __init__(
        self, spec: ModelSpec, model: Any, tokenizer: Any, settings: Settings | None = None, adapter: Any = None
    ) -> None:
        self.spec = spec
        self.model = model  # a staged model's shell (its module tree; the weights live on its stages)
        self.model_cpu_s = 0.0  # CPU time this process spent in the model's runs (hooks included)
        found = adapter or CausalLMAdapter(model, tokenizer)
        self.adapter: Any = found if isinstance(found, StagedAdapter) else _Timed(found, self)
        self.tree = ModuleTree.from_module(model, operations=module_operations)
        self.paths = self.tree.paths()
        settings = settings or Settings()
        self.limits = limits_for(spec, settings)
        self.continuous = settings.continuous_batching
        self._custom_decoding = _adds_processors(getattr(model, "generation_config", None))
        self.running: list[str] = []  # the jobs of the run in progress
        self.finished: dict[str, Outcome] = {}  # outcomes of the current batch so far
        self.generation: tuple[str, Generation] | None = None  # the running generation, and its kind
        self._joined: dict[str, Future[Outcome]] = {}  # jobs that joined it from another batch
        self._join_lock = threading.Lock()
        # Told each job's outcome as soon as it is known (a generation's jobs end one by one).
        self.on_outcome: Any = None
        self.on_tokens: Any = None  # told each generation step's tokens of jobs that stream

    def decode(self, payload: bytes) -> tuple[list[Graph], dict[str, torch.Tensor]]:
        """The same validation as the gateway's (one function, the same limits)."""
        graphs, blob = decode_request(payload, self.limits, self.paths)
        return graphs, load_blob(blob)

    def run(self, jobs: list[tuple[str, bytes]]) -> dict[str, Outcome]:
        """Every job's outcome (decoding and running in one go)."""
        decoded, invalid = self.prepare(jobs)
        return {**invalid, **self.run_decoded(decoded)}

    def prepare(self, jobs: list[tuple[str, bytes]]) -> tuple[list[Decoded], dict[str, Outcome]]:
        """Decode and validate each job's payload, without touching the model (so a replica can do
        it for its next batch while the current one runs): the decoded jobs, and the outcomes of
        those that were refused."""
        invalid: dict[str, Outcome] = {}
        decoded: list[Decoded] = []
        for job_id, payload in jobs:
            try:
                graphs, tensors = self.decode(payload)
            except GraphError as exc:
                invalid[job_id] = Outcome(error=f"invalid graph: {exc}", node=exc.node, trace=exc.trace)
                continue
            except Exception as exc:  # bytes the validator passed but the loader refused: this job's alone
                invalid[job_id] = Outcome(error=f"invalid tensors: {type(exc).__name__}: {exc}")
                continue
            decoded.append((job_id, graphs, tensors))
        return decoded, invalid

    def run_decoded(self, decoded: list[Decoded]) -> dict[str, Outcome]:
        """Every decoded job's outcome. Progress is visible meanwhile (`running`, `finished`), so a
        watchdog that gives up on a stuck run knows whose it is and what is done."""
        outcomes: dict[str, Outcome] = {}
        self.finished = outcomes
        self.running = []
        generating: dict[str, list[Decoded]] = {}
        for job in decoded:
            kind = self._generation_kind(job)
            if kind is not None:
                generating.setdefault(kind, []).append(job)
        for kind, jobs in generating.items():
            outcomes.update(self._generate(kind, jobs))
        for group in self._merge_groups([job for job in decoded if job[0] not in outcomes]):
            self.running = [job_id for job_id, _, _ in group]
            outcomes.update(self._run_merged(group))
        for job_id, graphs, tensors in decoded:
            if job_id not in outcomes:
                self.running = [job_id]
                outcomes[job_id] = self._run_one(graphs, tensors)
        self.running = []
        return outcomes

    def _generation_kind(self, job: Decoded) -> str | None:
        """Which running generation a job may join ("generate", or "generate+eager" when it reads
        attention weights), or None: it runs another way."""
        _, graphs, _ = job
        if len(graphs) != 1 or isinstance(self.adapter, StagedAdapter) or not self.continuous:
            return None
        if not isinstance(getattr(self.adapter, "inner", self.adapter), CausalLMAdapter):
            return None
        kind = _merge_kind(graphs[0])
        if kind != "generate" or self._custom_decoding or any(_reads_source(node) for node in graphs[0].nodes):
            # A model whose generation config adds logits processors (repetition penalty...), or
            # a job reading inside a forward (`.source`: one rewrite of a module serves one
            # interleaver), uses Hugging Face's `generate` on the merged graph instead.
            return None
        return kind + "+eager" if reads_attention_weights(graphs[0], self.model) else kind

    def joinable(self, jobs: list[Decoded]) -> list[Decoded]:
        """The jobs that the generation running now would take (none if none runs)."""
        running = self.generation
        return [job for job in jobs if running is not None and self._generation_kind(job) == running[0]]

    def join(self, jobs: list[Decoded]) -> dict[str, Future[Outcome]]:
        """Hand jobs to the generation running now (called from any thread): they join it at its
        next step. The futures of those that joined; the others wait for a turn of their own."""
        with self._join_lock:
            running = self.generation
            if running is None:
                return {}
            kind, generation = running
            if time.monotonic() - generation.started > self.spec.limits.timeout_s:
                return {}  # an old generation drains: no run lasts past its batch's watchdog
            # No more jobs at once than a batch may hold (its memory is sized for max_batch).
            room = self.spec.limits.max_batch - generation.size()
            joining = [job for job in jobs if self._generation_kind(job) == kind][: max(room, 0)]
            if not joining:
                return {}
            futures: dict[str, Future[Outcome]] = {job[0]: Future() for job in joining}
            if not generation.offer([self._member(job) for job in joining]):
                return {}
            self._joined.update(futures)
            self.running.extend(futures)
            return futures

    def _member(self, job: Decoded) -> Member:
        job_id, graphs, tensors = job
        start = time.monotonic()
        return Member(job_id, graphs[0], tensors, self._budget(start), started=start)

    def _generate(self, kind: str, jobs: list[Decoded]) -> dict[str, Outcome]:
        """Every generate job of `kind` in one generation, which jobs of later batches join."""
        outcomes: dict[str, Outcome] = {}
        solo: list[Member] = []

        def ended(member: Member, saved: dict[int, Any] | None, failure: BaseException | None) -> None:
            if isinstance(failure, NeedsSolo):
                solo.append(member)  # not its failure: it runs alone once the generation is over
                return
            if failure is None and saved is not None:
                try:
                    outcome = self._finish([saved], False, member.started)
                    outcome.shared = member.peers
                except Exception as exc:  # e.g. a saved value that cannot be encoded: its own failure
                    outcome = _failed(exc, member.started)
            else:
                outcome = _failed(failure or RuntimeError("the job ended without a result"), member.started)
            self._report(member.job_id, outcome, outcomes)

        generation = Generation(getattr(self.adapter, "inner", self.adapter), kind.endswith("+eager"), ended)
        generation.on_tokens = self._tokens
        generation.offer([self._member(job) for job in jobs])
        with self._join_lock:
            self.running = [job[0] for job in jobs]
            self.generation = (kind, generation)
        cpu = time.thread_time()
        try:
            with private_rng(None):
                generation.run()
        finally:
            with self._join_lock:
                self.generation = None
            self.model_cpu_s += time.thread_time() - cpu
            self._clean()
        for member in solo:
            with self._join_lock:
                self.running.append(member.job_id)
            self._report(member.job_id, self._run_one([member.graph], member.tensors), outcomes)
        return outcomes

    def _tokens(self, steps: list[tuple[str, int, list[int]]]) -> None:
        heard = self.on_tokens  # read once: the replica may unset it meanwhile
        if heard is not None:
            heard(steps)

    def _report(self, job_id: str, outcome: Outcome, outcomes: dict[str, Outcome]) -> None:
        """A job's outcome, the moment it has one: to the batch that joined it, or to this one's."""
        with self._join_lock:
            future = self._joined.pop(job_id, None)
            if job_id in self.running:
                self.running.remove(job_id)
        if future is not None:
            future.set_result(outcome)
        else:
            outcomes[job_id] = self.finished[job_id] = outcome
            if self.on_outcome is not None:
                self.on_outcome(job_id, outcome)

    def _merge_groups(self, decoded: list[Decoded]) -> list[list[tuple[str, Graph, dict[str, torch.Tensor]]]]:
        """Jobs that may share one forward pass (or one generate), two or more to a group: the
        same kind, whatever their prompts' lengths (each job is laid out as alone and sees its own
        columns: `h[:, 0]` is its first token merged as alone). A model split into pipeline
        stages merges only prompts of one width (its stages run the batch as it comes)."""
        by_kind: dict[str, list[tuple[str, Graph, dict[str, torch.Tensor]]]] = {}
        for job_id, graphs, tensors in decoded:
            kind = _merge_kind(graphs[0]) if len(graphs) == 1 else None
            if kind is not None and reads_attention_weights(graphs[0], self.model):
                kind += "+eager"  # runs with eager attention: merged only with jobs that do too
            if kind is not None:
                by_kind.setdefault(kind, []).append((job_id, graphs[0], tensors))
        groups: dict[tuple[str, int], list[tuple[str, Graph, dict[str, torch.Tensor]]]] = {}
        for kind, jobs in by_kind.items():
            for job in jobs if len(jobs) > 1 else []:  # a lone job is never tokenized twice
                width = self._prompt_width(job[1], job[2])
                if width is not None:
                    staged = isinstance(self.adapter, StagedAdapter) or kind.startswith("generate")
                    groups.setdefault((kind, width if staged else 0), []).append(job)
        return [group for group in groups.values() if len(group) > 1]

    def _prompt_width(self, graph: Graph, tensors: dict[str, torch.Tensor]) -> int | None:
        try:
            widths = [
                len(ids)
                for inv in graph.invokes
                for ids, _ in self.adapter.rows_for(_resolved(inv.args, tensors), _resolved(inv.kwargs, tensors))
            ]
        except Exception:  # inputs it cannot read: its own run says why
            return None
        return max(widths) if widths else None

    def _budget(self, start: float) -> Budget:
        return Budget(deadline=start + self.spec.limits.timeout_s)

    def _run_one(self, graphs: list[Graph], tensors: dict[str, torch.Tensor]) -> Outcome:
        start = time.monotonic()
        try:
            seed = graphs[0].options.get("seed") if len(graphs) == 1 else None
            with private_rng(seed if isinstance(seed, int) else None):
                saved = run_session(graphs, tensors, self.adapter, self._budget(start))
            return self._finish(saved, len(graphs) > 1, start)
        except StageLost:
            raise  # not the job's failure: the replica has lost part of its model
        except Exception as exc:  # a job's failure must never take the replica down
            return _failed(exc, start)
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
        # Each job's invokes: its own layout of a merged trace, or its own decoding of a generate.
        spans, first = [], 0
        for _, graph, _ in jobs:
            spans.append((first, first + len(graph.invokes), dict(graph.options)))
            first += len(graph.invokes)
        if merged.kind == "generate":
            # One generate for every job: each keeps its own decoding and number of new tokens.
            merged.options = {"max_new_tokens": max(int(options["max_new_tokens"]) for _, _, options in spans)}
        start = time.monotonic()
        try:
            with private_rng(None):
                # Every job's saved values reach the host together: one copy per device and dtype.
                saved = to_host(run_graph(merged, tensors, self.adapter, self._budget(start), isolated=True, spans=spans))
        except StageLost:
            self._clean()
            raise
        except Exception as exc:
            self._clean()
            culprit = _owner(exc, offsets)
            if culprit is not None and len(jobs) > 2:
                # One job's node failed: it runs alone (its error is then its own, as alone) and
                # the others share a pass again, so a failing job cannot make them all run alone.
                job_id, graph, t = jobs[culprit]
                self.running = [job_id]
                alone = {job_id: self._run_one([graph], t)}
                self.finished.update(alone)
                rest = jobs[:culprit] + jobs[culprit + 1 :]
                self.running = [job[0] for job in rest]
                return {**alone, **self._run_merged(rest)}
            # A job needs a run of its own (NeedsSolo), or the failure has no owner: each runs
            # alone, so a failure stays with its owner.
            alone = {}
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
                outcomes[job_id].shared = len(jobs)
            except Exception as exc:  # e.g. a saved value that cannot be encoded: its owner's failure
                outcomes[job_id] = Outcome(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - start)
        return outcomes

    def _clean(self) -> None:
        for parameter in self.model.parameters():
            parameter.grad = None


class _Timed:
    """An adapter whose model runs are counted in the executor's `model_cpu_s` (thread CPU time:
    what the forward pass cost this process, whatever else the machine did meanwhile)."""

    def __init__(self, adapter: Any, executor: BatchExecutor) -> None:
        self._adapter = adapter
        self._executor = executor
        self.root = adapter.root
        self.inner = adapter  # a generation calls the model itself, and counts its own time

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def forward(self, batch: Any) -> Any:
        start = time.thread_time()
        try:
            return self._adapter.forward(batch)
        finally:
            self._executor.model_cpu_s += time.thread_time() - start

    def generate(self, batch: Any, decodings: Any, on_end: Any = None) -> Any:
        start = time.thread_time()
        try:
            return self._adapter.generate(batch, decodings, on_end)
        finally:
            self._executor.model_cpu_s += time.thread_time() - start


def _reads_source(node: Node) -> bool:
    return node.op in ("output", "input", "inputs", "set_output", "set_input", "set_inputs") and (
        split_source(str(node.args[0])) is not None
    )


# Generation-config settings that make `generate` add logits processors of its own (their
# defaults mean none); the continuous generation picks tokens with the job's decoding only.
_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "typical_p": 1.0, "min_p": None,
    "guidance_scale": None, "watermarking_config": None, "diversity_penalty": 0.0,
}  # fmt: skip


def _adds_processors(config: Any) -> bool:
    if config is None:
        return False
    return any(getattr(config, name, default) not in (default, None) for name, default in _PROCESSOR_DEFAULTS.items())


def _owner(exc: BaseException, offsets: list[int]) -> int | None:
    """The index of the merged job whose node raised `exc`, if a node of one did."""
    node = exc.node if isinstance(exc, InterventionError) else None
    if node is None:
        return None
    owners = [index for index, offset in enumerate(offsets) if offset <= node]
    return owners[-1] if owners else None


def _failed(exc: BaseException, start: float) -> Outcome:
    """The outcome of a job that failed with `exc`, as its owner should read it."""
    seconds = time.monotonic() - start
    if isinstance(exc, InterventionError):
        return Outcome(error=exc.reason, node=exc.node, seconds=seconds, trace=exc.trace)
    if isinstance(exc, torch.OutOfMemoryError):
        return Outcome(error="out of memory: save less, or use fewer or shorter prompts", seconds=seconds)
    return Outcome(error=f"{type(exc).__name__}: {exc}", seconds=seconds)


def _merge_kind(graph: Graph) -> str | None:
    """Whether a job may share a run, and which kind: a plain trace ("trace", no options), or a
    generation whose only options are decoding settings ("generate"); never one that asked to be
    exact. Every invoke must name its
    own rows (an invoke without inputs is the whole batch); no gradients or early stop; a seeded
    generation whose graph draws random numbers runs alone (its seed seeds those draws too)."""
    if graph.options.get("exact"):
        return None  # asked to run alone: bit-identical to its solo run, whoever else is queued
    if any(inv.args is None for inv in graph.invokes) or any(node.op in _UNMERGEABLE for node in graph.nodes):
        return None
    if graph.kind == "trace":
        return "trace" if not graph.options else None
    if graph.kind != "generate" or not set(graph.options) <= DECODING_OPTIONS:
        return None
    if "seed" in graph.options and any(_draws_random(node) for node in graph.nodes):
        return None
    return "generate"


def _draws_random(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and any(word in str(node.args[0]) for word in _RANDOM)


def _resolved(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    return map_leaves(value, lambda leaf: tensors[leaf.name] if isinstance(leaf, TensorRef) else leaf)


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
    """Several jobs as one graph (nnfabric.graph.merging.merge) with their tensors, renamed as the
    merged graph names them."""
    merged, offsets = merge([graph for graph, _ in parts])
    tensors = {job_prefix(index) + name: t for index, (_, own) in enumerate(parts) for name, t in own.items()}
    return merged, tensors, offsets
