"""How each kind of model turns the invokes' inputs into one batch and runs it.

Usage::

    adapter = CausalLMAdapter(hf_model, tokenizer)      # or ModuleAdapter(torch_module)
    batch = adapter.batch(invoke_inputs)                # one forward pass for all invokes
    output = adapter.forward(batch)                     # or adapter.generate(batch, options)

Language models left-pad every invoke's prompts to one length, with an attention mask and
position ids that ignore the padding, so a padded row computes what it would alone. Several
jobs in one batch (`batch(invokes, jobs=...)`) each keep that layout of their own, padded on the
right to the batch's length: a causal model's real tokens never see the padding after them, so
each job computes what it would alone, and its invokes' `Columns` cut it its own view.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .decoding import Decoding, PerJobDecoding
from .devices import input_device, to_device
from .interleaver import Columns


@dataclass
class Batch:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: list[tuple[int, int] | None]
    size: int
    lengths: list[int] = field(default_factory=list)
    windows: dict[int, Columns] = field(default_factory=dict)  # invoke -> its job's own columns


def _rows_of(sizes: list[int | None]) -> tuple[list[tuple[int, int] | None], int]:
    """Row ranges per invoke: an invoke with no input (None) covers the whole batch."""
    rows: list[tuple[int, int] | None] = []
    start = 0
    for size in sizes:
        if size is None:
            rows.append(None)
        else:
            rows.append((start, start + size))
            start += size
    if start == 0:
        raise ValueError("the trace has no inputs: pass them to trace()/generate() or to tracer.invoke(...)")
    if sum(1 for s in sizes if s is not None) == 1:
        # A single input invoke covers the whole batch: no slicing, no copies.
        rows = [None] * len(sizes)
    return rows, start


class ModuleAdapter:
    """Any torch module: each invoke's positional tensors are concatenated along dim 0."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.root = module

    def batch(
        self, invokes: list[tuple[list[Any] | None, dict[str, Any]]], jobs: list[tuple[int, int]] | None = None
    ) -> Batch:
        given = [(a, k) for a, k in invokes if a is not None]
        sizes = [None if a is None else _batch_size(a, k) for a, k in invokes]
        rows, total = _rows_of(sizes)
        if len(given) == 1:
            return Batch(tuple(given[0][0]), dict(given[0][1]), rows, total)
        arity = {len(a) for a, _ in given}
        if len(arity) != 1:
            raise ValueError("every invoke must pass the same number of inputs")
        args = tuple(_concat([a[i] for a, _ in given]) for i in range(arity.pop()))
        kwargs = {name: _concat([k[name] for _, k in given]) for name in given[0][1]}
        return Batch(args, kwargs, rows, total)

    def forward(self, batch: Batch) -> Any:
        device = input_device(self.root)
        return self.root(*to_device(batch.args, device), **to_device(batch.kwargs, device))

    def generate(
        self, batch: Batch, decodings: list[Decoding], on_end: Callable[[int, int], None] | None = None
    ) -> Any:
        raise TypeError("generate() needs a language model; use trace() for a plain module")


_HEADS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "n_kv_heads", "multi_query_group_num")


def _config_ints(config: Any, depth: int = 0) -> dict[str, int]:
    """Every integer a model config names, sub-configs (a text config...) included."""
    found: dict[str, int] = {}
    items = config.items() if isinstance(config, dict) else vars(config).items() if config is not None else []
    for name, value in items:
        if isinstance(value, int) and not isinstance(value, bool):
            found.setdefault(name, value)
        elif depth < 3 and (isinstance(value, dict) or hasattr(value, "to_dict")):
            for inner, number in _config_ints(value, depth + 1).items():
                found.setdefault(inner, number)
    return found


def _row_widths(jobs: list[tuple[int, int]], per_invoke: list[Any], widths: list[int]) -> list[int]:
    """Each row's job width, in the batch's row order."""
    found = []
    for (first, stop), own in zip(jobs, widths, strict=True):
        found += [own] * sum(len(r) for r in per_invoke[first:stop] if r)
    return found


def _batch_size(args: list[Any], kwargs: dict[str, Any]) -> int:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("an invoke's inputs need at least one tensor with a batch dimension")


def _concat(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    if all(v == values[0] for v in values):
        return values[0]
    raise ValueError("non-tensor inputs must be equal across invokes to batch them")


class CausalLMAdapter:
    """A Hugging Face causal LM and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | None = None) -> None:
        self.root = model
        self.tokenizer = tokenizer
        self.device = device  # where inputs go; None: where the model's input embedding is, at each run
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", None) or 0
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad)
        self._sizes: set[int] | None = None  # every size the model's weights and config use

    def rows_for(self, args: list[Any], kwargs: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
        """One invoke's inputs -> rows of (token ids, attention mask)."""
        if kwargs:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise ValueError("dict inputs need 'input_ids'")
            other = sorted(set(kwargs) - {"input_ids", "attention_mask"})
            if other:
                raise ValueError(
                    f"a language model's inputs are input_ids and attention_mask, not {', '.join(map(repr, other))}: "
                    "pass other keywords to the model's forward as trace(..., name=value)"
                )
            mask = kwargs.get("attention_mask")
            ids_t = torch.as_tensor(ids).reshape(-1, torch.as_tensor(ids).shape[-1])
            mask_t = torch.ones_like(ids_t) if mask is None else torch.as_tensor(mask).reshape(ids_t.shape)
            return [(i.tolist(), m.tolist()) for i, m in zip(ids_t, mask_t, strict=True)]
        if len(args) != 1:
            raise ValueError("a language model invoke takes one input: text, a list of texts, or token ids")
        value = args[0]
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError("a language model input must be text, a list of texts, or token ids")
        rows = []
        for item in value:
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise ValueError("this model has no tokenizer: pass token ids")
                ids = list(self.tokenizer(item)["input_ids"])
            elif isinstance(item, list) and all(isinstance(v, int) for v in item):
                ids = item
            else:
                raise ValueError(f"cannot use {type(item).__name__} as a prompt")
            if not ids:
                raise ValueError("a prompt must have at least one token")
            rows.append((ids, [1] * len(ids)))
        return rows

    def batch(
        self, invokes: list[tuple[list[Any] | None, dict[str, Any]]], jobs: list[tuple[int, int]] | None = None
    ) -> Batch:
        """One batch for every invoke. `jobs` (the invokes of each job, [first, stop)) when
        several jobs share it: each job is laid out as alone, then padded on the right."""
        given = [(a, k) for a, k in invokes if a is not None]
        if jobs is not None and len(jobs) > 1:
            return self._jobs_batch(invokes, jobs)
        if len(given) == 1 and not given[0][1] and len(given[0][0]) == 1:
            ids = given[0][0][0]
            if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() in (1, 2) and ids.numel():
                # Token ids as one tensor, one invoke: every row has one length, so nothing to pad or
                # rebuild (the common local trace pays no per-token Python work).
                ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
                rows, total = _rows_of([None if a is None else int(ids.shape[0]) for a, _ in invokes])
                return Batch((), {"input_ids": ids.long()}, rows, total, lengths=[int(ids.shape[1])] * total)
        per_invoke = [None if a is None else self.rows_for(a, k) for a, k in invokes]
        rows, total = _rows_of([None if r is None else len(r) for r in per_invoke])
        all_rows = [row for r in per_invoke if r is not None for row in r]
        width = max(len(ids) for ids, _ in all_rows)
        padded = any(len(ids) < width or 0 in mask for ids, mask in all_rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids, _ in all_rows])
        mask = torch.tensor([[0] * (width - len(m)) + m for _, m in all_rows])
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if padded:
            kwargs["attention_mask"] = mask
            if self.takes_position_ids:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch((), kwargs, rows, total, lengths=[len(ids) for ids, _ in all_rows])

    def _jobs_batch(self, invokes: list[tuple[list[Any] | None, dict[str, Any]]], jobs: list[tuple[int, int]]) -> Batch:
        per_invoke = [None if a is None else self.rows_for(a, k) for a, k in invokes]
        rows, total = _rows_of([None if r is None else len(r) for r in per_invoke])
        widths = [max(len(ids) for r in per_invoke[first:stop] if r for ids, _ in r) for first, stop in jobs]
        width = self.sequence_length(max(widths)) if len(set(widths)) > 1 else widths[0]
        ids_rows: list[list[int]] = []
        mask_rows: list[list[int]] = []
        windows: dict[int, Columns] = {}
        for (first, stop), own in zip(jobs, widths, strict=True):
            for invoke in range(first, stop):
                if own != width:
                    windows[invoke] = Columns(width, 0, own)
                for ids, mask in per_invoke[invoke] or []:
                    pad = own - len(ids)
                    ids_rows.append([self.pad_id] * pad + ids + [self.pad_id] * (width - own))
                    mask_rows.append([0] * pad + mask + [0] * (width - own))
        ids = torch.tensor(ids_rows)
        # A mask of ones says "no padding to hide" (transformers warns when pad ids come unmasked).
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if any(0 in mask[: own] for mask, own in zip(mask_rows, _row_widths(jobs, per_invoke, widths), strict=True)):
            # Some job pads its own prompts (on the left, as alone): masks and positions as alone.
            # Otherwise none: a real token never sees the padding after it, and positions count
            # from 0 in every row, so each job runs the very kernels it runs alone.
            mask = torch.tensor(mask_rows)
            kwargs["attention_mask"] = mask
            if self.takes_position_ids:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch((), kwargs, rows, total, lengths=[sum(m) for m in mask_rows], windows=windows)

    def sequence_length(self, longest: int) -> int:
        """The padded length of a batch of jobs of different lengths: at least `longest`, and no
        other size the model uses (hidden, heads, head size, vocabulary, layers...), so that a
        tensor's sequence dimension is known by its size."""
        width = longest
        while width in self.model_sizes():
            width += 1
        return width

    def model_sizes(self) -> set[int]:
        """Every size the model's weights and config name (computed once)."""
        if self._sizes is None:
            tensors = [*self.root.parameters(), *self.root.buffers()]
            found = {int(n) for t in tensors for n in t.shape}
            config = getattr(self.root, "config", None)
            numbers = _config_ints(config)
            found |= set(numbers.values())
            # Per-head sizes appear in no weight's shape: hidden / heads, and its rotary part.
            for width in (numbers.get(k) for k in ("hidden_size", "n_embd", "d_model", "embed_dim", "dim")):
                for heads in (numbers.get(k) for k in _HEADS):
                    if width and heads and width % heads == 0:
                        found |= {width // heads, width // heads // 2}
                        factor = getattr(config, "partial_rotary_factor", None)
                        if isinstance(factor, float):
                            found.add(int(width // heads * factor))
            self._sizes = found
        return self._sizes

    def forward(self, batch: Batch) -> Any:
        # Token ids, masks and positions are made here on the CPU; the model reads them where its
        # input embedding is (a GPU, or the first of several).
        device = self.device or input_device(self.root)
        return self.root(*to_device(batch.args, device), **to_device(batch.kwargs, device))

    def generate(
        self, batch: Batch, decodings: list[Decoding], on_end: Callable[[int, int], None] | None = None
    ) -> Any:
        """One `generate` for every row; each job's decoding as `decodings` says (its rows, greedy
        or sampling, its own random stream and number of new tokens). `on_end(job, step)` hears
        the last step each job would have run alone."""
        from transformers import LogitsProcessorList

        kwargs = {k: v for k, v in batch.kwargs.items() if k != "position_ids"}
        kwargs.setdefault("attention_mask", torch.ones_like(kwargs["input_ids"]))
        kwargs = to_device(kwargs, self.device or input_device(self.root))
        processor = PerJobDecoding(
            decodings, kwargs["input_ids"].shape[1], self.pad_id, getattr(self.root, "generation_config", None), on_end
        )
        if len(decodings) == 1 and decodings[0].seed is not None:
            torch.manual_seed(decodings[0].seed)  # a lone job's seed also seeds its graph's random ops
        extra: dict[str, Any] = {"logits_processor": LogitsProcessorList([processor])} if processor.needed else {}
        longest = max(d.max_new_tokens for d in decodings)
        return self.root.generate(**kwargs, max_new_tokens=longest, do_sample=False, pad_token_id=self.pad_id, **extra)
