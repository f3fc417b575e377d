"""One generation that jobs join and leave: continuous batching with each job's own view.

Usage::

    generation = Generation(adapter, eager=False, ended=on_end)   # on_end(member, saved, error)
    generation.offer([member, ...])    # from any thread: they join at the next step
    generation.run()                   # in the model's thread, until no job is left

Every job keeps an interleaver of its own on the model (its own graph, steps and rows), and
the loop calls the model one step at a time for all of them:
- Jobs that join are prefilled together in one forward pass (only their rows), each prompt
  laid out as alone and left-padded to the joiners' length; their key/value caches then join
  the running ones, the shorter side padded on the left with masked columns. So every job's
  keys are always the last columns of the cache, and its view of any sequence dimension is a
  contiguous cut (`Columns`): position 0 is its first token, -1 its last, at every step.
- Each step after that feeds every running row its last token. A job's tokens are picked from
  its own rows' logits with its own decoding (greedy, or sampling from its own generator).
- A job whose generation ends (its `max_new_tokens`, or every row at an end-of-sequence token,
  as alone) leaves at once: its interleaver finishes, and its rows leave the cache, so it stops
  costing. Columns every remaining row masks are dropped from the cache's left.
- A job's failure inside a hook stays its own (its interleaver is `contained`): it leaves, its
  rows are dropped, and its batch-mates' forward pass goes on untouched.

Hugging Face's own continuous batching (`generate_batch`, a paged cache) packs every request's
tokens into one row of a flattened batch: a module's output there is not "a job's rows", so a
job could not be shown its own view without gathering per token at every hook. This loop keeps
the model's batch dimension as the job boundary (docs/architecture.md: "Merging").
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from nnfabric.errors import InterventionError
from nnfabric.graph.ir import Graph
from nnfabric.runtime.adapters import Batch, CausalLMAdapter
from nnfabric.runtime.decoding import Decoding, PerJobDecoding
from nnfabric.runtime.devices import input_device, to_device, to_host
from nnfabric.runtime.execute import eager_attention, resolve_inputs
from nnfabric.runtime.guards import Budget, NeedsSolo
from nnfabric.runtime.interleaver import Columns, Interleaver

Ended = Callable[["Member", "dict[int, Any] | None", "BaseException | None"], None]


@dataclass
class Member:
    """One job in the generation: its graph, its tensors, its batch alone, its progress."""

    job_id: str
    graph: Graph
    tensors: dict[str, torch.Tensor]
    budget: Budget
    batch: Batch | None = None  # its invokes' inputs as they would run alone
    run: Interleaver | None = None
    decoding: Decoding | None = None
    warpers: list[Any] = field(default_factory=list)
    local_rows: list[tuple[int, int]] = field(default_factory=list)  # per invoke, within its own rows
    tokens: list[torch.Tensor] = field(default_factory=list)  # each step's token per row
    finished_rows: torch.Tensor | None = None  # rows that met an end-of-sequence token
    started: float = field(default_factory=time.monotonic)
    peers: int = 1  # the most jobs that shared a forward pass with it (itself included)

    @property
    def size(self) -> int:
        assert self.batch is not None
        return self.batch.size

    @property
    def width(self) -> int:
        assert self.batch is not None
        return int(self.batch.kwargs["input_ids"].shape[1])


class Generation:
    def __init__(self, adapter: CausalLMAdapter, eager: bool, ended: Ended) -> None:
        self.adapter = adapter
        self.model = adapter.root
        self.eager = eager
        self.ended = ended
        self.members: list[Member] = []  # in row order
        self._pending: list[Member] = []
        self._lock = threading.Lock()
        self._open = True
        self._count = 0  # jobs offered and not yet ended
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        self.eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
        self.config = config
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 where a row's real token is
        self.steps = 0  # forward passes so far (the measure of what the generation cost)
        self.started = time.monotonic()
        self._fresh: dict[int, torch.Tensor] = {}
        # Told each step's new tokens of the jobs that asked to stream: [(job id, step, tokens)].
        self.on_tokens: Callable[[list[tuple[str, int, list[int]]]], None] | None = None
        # As `generate` does: the model computes logits for the last position only, so a job's
        # reads of the head's output have the shape they have alone.
        parameters = inspect.signature(self.model.forward).parameters
        self._keep_last = "logits_to_keep" in parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5

    # -- joining ---------------------------------------------------------------------------------
    def offer(self, members: list[Member]) -> bool:
        """Queue jobs to join at the next step; False once the generation has ended."""
        with self._lock:
            if not self._open:
                return False
            self._pending.extend(members)
            self._count += len(members)
            return True

    def size(self) -> int:
        """The jobs in it now and those about to join."""
        with self._lock:
            return self._count

    def _take(self) -> list[Member]:
        with self._lock:
            joining, self._pending = self._pending, []
            if not joining and not self.members:
                self._open = False  # nothing left: later offers start a generation of their own
            return joining

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            with torch.no_grad(), eager_attention(self.model, self.eager):
                while True:
                    joining = self._take()
                    if joining:
                        self._prefill(joining)
                    elif not self.members:
                        return
                    if self.members:
                        self._step()
        except BaseException as exc:  # the model failed for everyone (out of memory...): each job hears why
            with self._lock:
                self._open = False
                left, self._pending = self.members + self._pending, []
            self.members = []
            for member in left:
                self._close(member, exc)
            if not isinstance(exc, Exception):
                raise

    def _prefill(self, joining: list[Member]) -> None:
        ready = []
        for member in joining:
            try:
                self._prepare(member)
                ready.append(member)
            except Exception as exc:
                self._close(member, exc)
        if not ready:
            return
        widths = [m.width for m in ready]
        width = self.adapter.sequence_length(max(widths)) if len(set(widths)) > 1 else widths[0]
        ids, mask, offset = [], [], 0
        for member in ready:
            assert member.batch is not None
            own_ids = member.batch.kwargs["input_ids"]
            own_mask = member.batch.kwargs.get("attention_mask")
            own_mask = torch.ones_like(own_ids) if own_mask is None else own_mask
            pad = width - member.width
            ids.append(torch.nn.functional.pad(own_ids, (pad, 0), value=self.adapter.pad_id))
            mask.append(torch.nn.functional.pad(own_mask, (pad, 0), value=0))
            self._place(member, offset, Columns(width, pad, width) if pad else None)
            offset += member.size
        input_ids, attention_mask = torch.cat(ids), torch.cat(mask)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        if self.adapter.takes_position_ids:
            # As `generate` numbers them (padding at position 1), so even a padded column reads
            # as it does in the job's own `generate`.
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        from transformers import DynamicCache

        cache = kwargs[self._cache_name] = DynamicCache()
        try:
            logits = self._forward(ready, offset, kwargs)
            self._join_cache(cache, attention_mask, ready)
        except Exception as exc:
            # The joiners' own pass failed (a prompt too long for the model...); the running jobs
            # never saw it. One joiner: its own error; several: each runs alone to find out whose.
            for member in ready:
                self._close(member, exc if len(ready) == 1 else NeedsSolo(f"a shared prefill failed: {exc}"))
            return
        self._pick(ready, logits)

    def _prepare(self, member: Member) -> None:
        graph = member.graph
        invokes = [(inv.args, inv.kwargs) for inv in graph.invokes]
        resolved = [
            (None if a is None else resolve_inputs(a, member.tensors), resolve_inputs(k, member.tensors))
            for a, k in invokes
        ]
        try:
            member.batch = self.adapter.batch(resolved)
        except (ValueError, TypeError) as exc:
            raise InterventionError(f"bad inputs: {exc}") from exc
        batch = member.batch
        member.local_rows = [(0, batch.size) if r is None else r for r in batch.rows]
        member.decoding = Decoding.of(graph.options, 0, batch.size)
        member.warpers = PerJobDecoding([member.decoding], member.width, self.adapter.pad_id, self.config).warpers[0]
        member.finished_rows = torch.zeros(batch.size, dtype=torch.bool)
        run = Interleaver(graph, member.tensors, self.model, batch.rows, batch.size, member.budget, isolated=True)
        run.contained = True
        run.fresh = self._fresh
        run.bypass = True
        run.__enter__()
        member.run = run

    def _place(self, member: Member, offset: int, window: Columns | None) -> None:
        """Where the job's rows and columns are in this forward pass."""
        run = member.run
        assert run is not None
        run.rows = [(offset + a, offset + b) for a, b in member.local_rows]
        run.windows = dict.fromkeys(range(len(member.local_rows)), window) if window is not None else {}

    def _forward(self, active: list[Member], size: int, kwargs: dict[str, Any]) -> torch.Tensor:
        """One forward pass in which only `active` jobs' interleavers take part; the last
        position's logits, as float32 (as `generate` picks from)."""
        for member in self.members:
            assert member.run is not None
            member.run.bypass = True
        for member in active:
            assert member.run is not None
            member.run.batch_size = size
            member.run.bypass = member.run.failure is not None
        self._fresh.clear()
        for member in active:
            member.peers = max(member.peers, len(active))
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        device = self.adapter.device or input_device(self.model)
        try:
            output = self.model(**to_device(kwargs, device))
        finally:
            self._fresh.clear()
            for member in active:
                assert member.run is not None
                member.run.bypass = True
        self.steps += 1
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits[:, -1, :].to(dtype=torch.float32)  # as `generate` picks from

    def _step(self) -> None:
        size = sum(m.size for m in self.members)
        assert self.mask is not None
        total = self.mask.shape[1] + 1
        while total in self.adapter.model_sizes() and any(self._seen(m) != total for m in self.members):
            self._pad_cache(1)  # a key length no other dimension of the model has: cut by size
            total += 1
        offset = 0
        for member in self.members:
            seen = self._seen(member)
            self._place(member, offset, Columns(total, total - seen, total) if seen != total else None)
            offset += member.size
        last = torch.cat([m.tokens[-1] for m in self.members]).reshape(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones(size, 1, dtype=self.mask.dtype)], dim=1)
        kwargs: dict[str, Any] = {
            "input_ids": last,
            "attention_mask": self.mask,
            self._cache_name: self.cache,
            "use_cache": True,
        }
        if self.adapter.takes_position_ids:
            kwargs["position_ids"] = (self.mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        members = list(self.members)
        try:
            logits = self._forward(members, size, kwargs)
        except Exception as exc:
            # The shared step failed, and whose input caused it is not known (a position past the
            # model's limit, out of memory...): every job runs again alone, where an error is its own.
            self.members, self.cache, self.mask = [], None, None
            for member in members:
                self._close(member, NeedsSolo(f"a shared step failed: {exc}"))
            return
        self._pick(members, logits)

    def _seen(self, member: Member) -> int:
        """The keys the job sees at the next step, alone: its prompt and every token fed since."""
        return member.width + len(member.tokens)

    # -- tokens and ends ----------------------------------------------------------------------
    def _pick(self, members: list[Member], logits: torch.Tensor) -> None:
        """Each job's token from its own rows of the pass's last-position logits (in row order)."""
        starts = [0, *itertools.accumulate(m.size for m in members)]
        leaving = []
        streamed: list[tuple[str, int, list[int]]] = []
        greedy = logits.argmax(dim=-1).cpu()  # one read of the device per step for every greedy row
        for member, start in zip(members, starts, strict=False):
            rows = slice(start, start + member.size)
            assert member.decoding is not None and member.finished_rows is not None
            if member.run is not None and member.run.failure is not None:
                leaving.append(member)
                continue
            try:
                member.budget.check_time()
                token = greedy[rows] if not member.decoding.do_sample else self._sample(member, logits[rows])
            except Exception as exc:
                member.run.failure = exc  # type: ignore[union-attr]
                leaving.append(member)
                continue
            token = torch.where(member.finished_rows, torch.full_like(token, self.adapter.pad_id), token)
            member.tokens.append(token)
            if member.graph.options.get("stream"):
                streamed.append((member.job_id, len(member.tokens) - 1, token.tolist()))
            if self.eos.numel():
                member.finished_rows = member.finished_rows | torch.isin(token, self.eos)
            if len(member.tokens) >= member.decoding.max_new_tokens or bool(member.finished_rows.all()):
                leaving.append(member)
        if streamed and self.on_tokens is not None:
            self.on_tokens(streamed)  # before any job's end: its tokens come before its result
        for member in leaving:
            self._leave(member)

    def _sample(self, member: Member, scores: torch.Tensor) -> torch.Tensor:
        """The job's token drawn from its own generator, through the warpers `generate` uses."""
        decoding = member.decoding
        assert decoding is not None
        scores = scores.cpu()
        ids = self._ids(member)
        for warper in member.warpers:
            scores = warper(ids, scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=decoding.generator).reshape(-1)

    def _ids(self, member: Member) -> torch.Tensor:
        """The job's ids so far, as its own `generate` would hold them."""
        assert member.batch is not None
        prompt = member.batch.kwargs["input_ids"]
        return torch.cat([prompt, *[t.reshape(-1, 1) for t in member.tokens]], dim=1) if member.tokens else prompt

    def _leave(self, member: Member) -> None:
        if member in self.members:
            index = self.members.index(member)
            start = sum(m.size for m in self.members[:index])
            keep = [i for i in range(sum(m.size for m in self.members)) if not start <= i < start + member.size]
            self.members.remove(member)
            self._keep_rows(keep)
        failure = member.run.failure if member.run is not None else None
        self._close(member, failure)

    def _close(self, member: Member, failure: BaseException | None) -> None:
        """The job's end: its remaining graph runs on its own rows and ids, and it hears its result."""
        run = member.run
        saved = None
        try:
            if run is not None and failure is None:
                steps = len(member.tokens)
                run.bypass = False
                run.rows = list(member.batch.rows) if member.batch is not None else run.rows
                run.batch_size = member.size
                run.windows = {}
                run.last_step.update(dict.fromkeys(range(len(member.graph.invokes)), steps - 1))
                run.final_output = self._ids(member)
                run.contained = False
                run.finish()
                saved = to_host(run.saved())
        except BaseException as exc:
            failure = exc
        finally:
            if run is not None:
                run.__exit__(None, None, None)
            with self._lock:
                self._count -= 1
        self.ended(member, saved, failure)

    # -- the cache ------------------------------------------------------------------------------
    def _join_cache(self, cache: Any, mask: torch.Tensor, joining: list[Member]) -> None:
        """The joiners' cache and mask added below the running rows', the shorter padded left."""
        if self.cache is None or not self.members:
            self.cache, self.mask = cache, mask
            self.members = list(joining)
            return
        assert self.mask is not None
        have, new = self.mask.shape[1], mask.shape[1]
        if have < new:
            self._pad_cache(new - have)
        elif new < have:
            _pad_layers(cache, have - new)
            mask = torch.nn.functional.pad(mask, (have - new, 0), value=0)
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, mask])
        self.members.extend(joining)

    def _pad_cache(self, columns: int) -> None:
        assert self.mask is not None
        _pad_layers(self.cache, columns)
        self.mask = torch.nn.functional.pad(self.mask, (columns, 0), value=0)

    def _keep_rows(self, keep: list[int]) -> None:
        """Only these rows go on; columns no remaining row sees are dropped from the left."""
        if self.mask is None:
            return
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        seen = mask.any(dim=0).nonzero()
        # Columns no remaining row attends to, but never into a job's own (masked) prompt columns.
        own = max(self._seen(m) for m in self.members) - 1 if self.members else 0
        drop = max(0, min(int(seen[0]) if seen.numel() else 0, mask.shape[1] - own))
        for layer in _layers(self.cache):
            device_index = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, device_index)[:, :, drop:]
            layer.values = layer.values.index_select(0, device_index)[:, :, drop:]
        self.mask = mask[:, drop:]


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise NeedsSolo("this model's cache cannot be shared by jobs joining and leaving")
    return list(layers)


def _pad_layers(cache: Any, columns: int) -> None:
    for layer in _layers(cache):
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))
