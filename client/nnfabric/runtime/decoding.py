"""Each job's own decoding inside one batched `generate`: greedy or sampling, its own settings and
random stream, and its own number of new tokens.

Usage::

    spans = [Decoding.of(options_a, 0, 2), Decoding.of(options_b, 2, 3)]    # rows [0, 2) and [2, 3)
    processor = PerJobDecoding(spans, prompt_width, pad_id, model.generation_config, on_end)
    model.generate(..., do_sample=False, logits_processor=[processor], max_new_tokens=max(...))
    # on_end(job, step): the last step the job's own generate would have run

Hugging Face's `generate` samples every row from one random stream, so rows of different jobs
would steer each other's draws. Instead `generate` runs greedy, and this processor picks each
sampling job's token with that job's own generator (seeded by the job, or at random), through
the same warpers `generate` uses, then forces it: a job alone and a job among others draw the
same numbers. A job's rows past its own `max_new_tokens` are forced to padding and cut off.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

DECODING_OPTIONS = frozenset({"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "stream"})


@dataclass
class Decoding:
    start: int  # the job's rows in the batch: [start, stop)
    stop: int
    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator = field(default_factory=torch.Generator, repr=False)

    @classmethod
    def of(cls, options: dict[str, Any], start: int, stop: int) -> Decoding:
        seed = options.get("seed")
        decoding = cls(
            start,
            stop,
            int(options.get("max_new_tokens", 1)),
            bool(options.get("do_sample", False)),
            options.get("temperature"),
            options.get("top_k"),
            options.get("top_p"),
            seed if isinstance(seed, int) else None,
        )
        decoding.generator.manual_seed(decoding.seed if decoding.seed is not None else secrets.randbits(63))
        return decoding


class PerJobDecoding:
    """A logits processor for a greedy `generate`: it decides the sampling jobs' tokens (and ends
    finished jobs' rows) by leaving a single allowed token in their rows."""

    def __init__(
        self,
        spans: list[Decoding],
        prompt_width: int,
        pad_id: int,
        config: Any = None,
        on_end: Callable[[int, int], None] | None = None,
    ) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.spans = spans
        self.width = prompt_width
        self.pad_id = pad_id
        # Told (job index, last step) when a job's own generate would stop: its max_new_tokens
        # reached, or every one of its rows at an end-of-sequence token.
        self.on_end = on_end
        self.ended: set[int] = set()
        self._eos: torch.Tensor | None = None  # the end-of-sequence ids, on the scores' device
        self._ended_rows = torch.zeros(0, dtype=torch.bool)  # rows that have met one so far
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        self.eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
        self.warpers: list[list[Any]] = []
        for span in spans:
            warpers: list[Any] = []
            if span.do_sample:
                # The settings `generate` would use: the job's, else the model's generation config.
                temperature = _setting(span.temperature, config, "temperature", 1.0)
                top_k = _setting(span.top_k, config, "top_k", None)
                top_p = _setting(span.top_p, config, "top_p", None)
                if temperature is not None and float(temperature) != 1.0:
                    if not float(temperature) > 0:
                        raise ValueError(f"temperature must be a positive number, got {temperature}")
                    warpers.append(TemperatureLogitsWarper(float(temperature)))
                if top_k is not None and int(top_k) != 0:
                    warpers.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
                if top_p is not None and float(top_p) < 1.0:
                    warpers.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
            self.warpers.append(warpers)

    @property
    def needed(self) -> bool:
        """Whether any row needs it (a lone greedy job does not: `generate` itself decodes it)."""
        return len(self.spans) > 1 or self.spans[0].do_sample

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.width
        out = scores
        for span, warpers in zip(self.spans, self.warpers, strict=True):
            rows = slice(span.start, span.stop)
            if step >= span.max_new_tokens:
                token = torch.full((span.stop - span.start, 1), self.pad_id, dtype=torch.long, device=scores.device)
            elif span.do_sample:
                own = scores[rows]
                for warper in warpers:
                    own = warper(input_ids[rows], own)
                probs = torch.softmax(own.float(), dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=span.generator).to(scores.device)
            else:
                continue
            if out is scores:
                out = scores.clone()
            forced = torch.full_like(out[rows], float("-inf"))
            forced.scatter_(1, token, 0.0)
            out[rows] = forced
        if self.on_end is not None:
            self._report_ends(input_ids, out, step)
        return out

    def _report_ends(self, input_ids: torch.Tensor, scores: torch.Tensor, step: int) -> None:
        """Tell `on_end` of every job whose own generate stops at this step. One read of the
        device per step for the whole batch (which rows have met an end-of-sequence token), not
        one per job: on a GPU each read waits for the queued work."""
        pending = [index for index in range(len(self.spans)) if index not in self.ended]
        if not pending:
            return
        done = {index for index in pending if step + 1 >= self.spans[index].max_new_tokens}
        if self.eos.numel() and len(done) < len(pending):
            if self._eos is None or self._eos.device != scores.device:
                self._eos = self.eos.to(scores.device)
                self._ended_rows = torch.isin(input_ids[:, self.width :], self._eos).any(dim=1)
            # What generate picks from these scores (greedy), added to what the rows picked before.
            self._ended_rows = self._ended_rows | torch.isin(scores.argmax(dim=-1), self._eos)
            ended = self._ended_rows.tolist()
            done |= {i for i in pending if all(ended[self.spans[i].start : self.spans[i].stop])}
        for index in sorted(done):
            self.ended.add(index)
            self.on_end(index, step)  # type: ignore[misc]


def _setting(value: Any, config: Any, name: str, default: Any) -> Any:
    """The job's setting, else the model's generation config's, else transformers' default."""
    if value is not None:
        return value
    found = getattr(config, name, None) if config is not None else None
    if found is not None:
        return found
    from transformers import GenerationConfig

    defaults: dict[str, Any] = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return defaults.get(name, default)
