"""Tracer: the `with model.trace(...)` block that records an intervention graph, then runs it.

Usage::

    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = model.transformer.h[3].output[0][:, -1].save()
        with tracer.invoke("The Colosseum is in"):
            model.transformer.h[3].output[0][:, -1] = clean
            logits = model.output.logits.save()

On exit the graph runs (locally or on the fabric) and saved proxies receive their values.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from ..backends import Remote
from ..errors import InterventionError
from .proxy import Proxy
from .recording import Recording, TracedModel, run_recordings

if TYPE_CHECKING:
    from ..remote.job import Job


class Tracer:
    """The `with` block of `model.trace()` / `model.generate()`: what a researcher writes with.
    Everything recorded goes through its `recording`."""

    def __init__(
        self,
        model: TracedModel,
        inputs: tuple[Any, ...],
        input_kwargs: dict[str, Any],
        kind: Literal["trace", "generate"] = "trace",
        options: dict[str, Any] | None = None,
        remote: Remote = False,
        blocking: bool = True,
    ) -> None:
        self.recording = Recording(model, kind, options)
        session, sweep = self.recording.session, model.open_sweep
        # A trace in a session or a sweep runs where that does.
        self._remote = session.remote if session is not None else sweep.remote if sweep is not None else remote
        self._blocking = session.blocking if session is not None else blocking
        self._implicit = bool(inputs) or bool(input_kwargs)
        if self._implicit:
            self.recording.invoke = self.recording.add_invoke(inputs, input_kwargs)

    @property
    def job(self) -> Job | None:
        """The fabric's job, for remote traces (`blocking=False`: wait on it)."""
        return self.recording.job

    # -- the block -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        self.recording.open(sys._getframe(1))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        recording = self.recording
        recording.close()
        if exc_type is not None:
            return
        if not recording.graph.invokes:
            raise ValueError("the trace has no inputs: pass them to trace()/generate() or use tracer.invoke(...)")
        if recording.session is not None:
            recording.session.recordings.append(recording)  # runs when the session ends
            return
        try:
            run_recordings(recording.model, [recording], session=False, remote=self._remote, blocking=self._blocking)
        except InterventionError as error:
            raise recording.at_user_line(error) from error.__cause__
        finally:
            recording.frame = None

    def invoke(self, *inputs: Any, **kwargs: Any) -> _InvokeBlock:
        """A batch group: its reads and writes touch only its own rows. No input: the whole batch."""
        if self._implicit:
            raise ValueError("inputs were given to trace() already; pass them to tracer.invoke() instead")
        return _InvokeBlock(self, inputs, kwargs)

    @property
    def iter(self) -> _IterIndexer:
        """`for step in tracer.iter[0:3]:` or `with tracer.iter[1:]:` address generation steps."""
        return _IterIndexer(self.recording)

    def all(self) -> _Steps:
        """Apply the block to every generation step (those that happen)."""
        return _Steps(self.recording, 0, self.recording.max_steps(), optional=True)

    def stop(self) -> None:
        """End the model's forward pass here; everything recorded before still runs."""
        self.recording.record("stop", [], {})

    @property
    def output(self) -> Proxy:
        """The model's result: its output for trace(), the generated token ids for generate()."""
        result: Proxy = self.recording.record("model_output", [], {})
        return result

    def cache(self, contains: str | None = None, inputs: bool = False) -> dict[str, Proxy]:
        """Save many modules' outputs at once, by path: every module, or those whose path has
        `contains` in it (`tracer.cache("mlp")`); with `inputs=True`, their inputs too (keys
        "<path>.input"). Modules the run does not call have no value. Remotely, within the
        model's `max_saved_bytes`."""
        recording = self.recording
        found: dict[str, Proxy] = {}
        for tree in recording.model.tree.walk():
            if not tree.path or (contains is not None and contains not in tree.path):
                continue
            for op, key in [("output", tree.path)] + ([("input", f"{tree.path}.input")] if inputs else []):
                proxy: Proxy = recording.record(op, [tree.path, recording.step, 0], {}, unordered=True)
                recording.save(proxy)
                found[key] = proxy
        if not found:
            raise ValueError(f"no module path contains {contains!r}; print(model) lists them")
        return found

    def list(self) -> Proxy:
        """An empty list to `.append` values to, e.g. one per generation step."""
        result: Proxy = self.recording.record("list", [], {})
        return result


class _InvokeBlock:
    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._tracer = tracer
        self._inputs = inputs
        self._kwargs = kwargs

    def __enter__(self) -> Tracer:
        recording = self._tracer.recording
        recording.invoke = recording.add_invoke(self._inputs, self._kwargs)
        return self._tracer

    def __exit__(self, *exc: Any) -> None:
        self._tracer.recording.invoke = None


class _IterIndexer:
    def __init__(self, recording: Recording) -> None:
        self._recording = recording

    def __getitem__(self, key: int | slice) -> _Steps:
        limit = self._recording.max_steps()
        if isinstance(key, int):
            if not 0 <= key < limit:
                raise IndexError(f"step {key} is out of range: this run has {limit} steps (0..{limit - 1})")
            return _Steps(self._recording, key, key + 1, optional=False)
        start, stop, step = key.indices(limit)
        if step != 1:
            raise ValueError("tracer.iter takes contiguous steps, e.g. tracer.iter[1:4]")
        return _Steps(self._recording, start, stop, optional=False)


class _Steps:
    """Generation steps. Iterate it to unroll a loop body per step, or use it as a `with` block."""

    def __init__(self, recording: Recording, start: int, stop: int, optional: bool) -> None:
        self._recording = recording
        self._start = start
        self._stop = stop
        self._optional = optional
        self._first = 0
        self._saved_step = 0

    def __iter__(self) -> Iterator[int]:
        recording = self._recording
        previous = recording.step
        try:
            for step in range(self._start, self._stop):
                recording.step = step
                yield step
        finally:
            recording.step = previous

    def __enter__(self) -> _Steps:
        recording = self._recording
        self._saved_step = recording.step
        recording.step = self._start
        self._first = len(recording.graph.nodes)
        recording.steps_blocks.append(self._stop - self._start)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        recording = self._recording
        recording.step = self._saved_step
        recording.steps_blocks.pop()
        if exc_type is not None:
            return
        recording.repeat_steps(self._first, self._start, self._stop, self._optional)
