"""Sweeps: many traces, each its own job, sent together and collected as they finish.

Usage::

    with model.sweep(remote=True) as sweep:            # traces inside are recorded, not run yet
        for layer in range(12):
            for position in range(8):
                with model.trace(corrupted):
                    model.transformer.h[layer].output[0][:, position] = clean[layer][:, position]
                    logits[layer, position] = model.lm_head.output[:, -1].save()
    # here every job has ended: saved values are filled in; one progress bar meanwhile
    #   (a line in a notebook, a bar on a terminal; `model.sweep(progress=False)` shows none)
    sweep.failed                                        # [(index, error)] of jobs that failed

On the fabric the jobs go over one connection, as many at once as the key may have active; each
is still its own job (fair share with other users, limits, failure, result). A failed job's
saved values raise its error when read; the other jobs are not affected. `remote=False` runs the
same sweep here, one trace after another, so a sweep can be tried locally first.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..backends import JobRequest, Remote
from ..errors import InterventionError
from ..remote.display import SweepProgress, progress_mode

if TYPE_CHECKING:
    from ..remote.job import Job
    from .recording import Recording, TracedModel


class Sweep:
    def __init__(self, model: TracedModel, remote: Remote = True, progress: bool | None = None) -> None:
        self._model = model
        self.remote = remote
        self.progress = progress  # None: a bar where someone watches (notebook, terminal); False: none
        self._pending: list[tuple[JobRequest, list[Recording]]] = []
        self.jobs: list[Job | None] = []  # each trace's job on the fabric (None where run here), in order
        self.failed: list[tuple[int, InterventionError]] = []  # (index of the trace, its error)

    def __len__(self) -> int:
        return len(self._pending) or len(self.jobs)

    def __enter__(self) -> Sweep:
        if self._model.open_sweep is not None or self._model.open_session is not None:
            raise RuntimeError("open the sweep outside any other sweep or session")
        if self._model.open_recording is not None:
            raise RuntimeError("open the sweep outside any trace")
        self._model.open_sweep = self
        return self

    def add(self, request: JobRequest, recordings: list[Recording]) -> None:
        """A trace (or session) whose block ended inside the sweep: one more job."""
        self._pending.append((request, recordings))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._model.open_sweep = None
        pending, self._pending = self._pending, []
        if exc_type is not None or not pending:
            return
        requests = [request for request, _ in pending]
        mode = progress_mode(self.progress)
        with SweepProgress(mode, len(requests)) as bar:

            def ended(index: int, error: InterventionError | None) -> None:
                if error is not None:
                    self.failed.append((index, error))
                    for recording in pending[index][1]:
                        recording.failure = error
                bar.advance(error is not None)

            self.jobs = self._model.backend(self.remote).run_many(requests, ended)
        for (_, recordings), job in zip(pending, self.jobs, strict=True):
            for recording in recordings:
                recording.frame = None
                recording.job = job if job is not None and job.id else None  # never accepted: no job
        self.failed.sort(key=lambda item: item[0])
        if self.failed and mode is not None:
            index, error = self.failed[0]
            print(f"{len(self.failed)} of {len(requests)} jobs failed; the first (trace {index}): {error}",
                  file=sys.stderr)  # fmt: skip
