"""Sessions: several traces sent as one job; later traces use earlier traces' values in place.

Usage::

    with model.session(remote=True) as session:
        with model.trace("The Eiffel Tower is in Paris"):
            paris = model.model.layers[12].output[0, -1]          # no .save() needed
        with model.generate("The Colosseum is in", max_new_tokens=5) as tracer:
            with tracer.all():
                model.model.layers[12].output[:, -1] += paris     # used here, on the fabric
            tokens = tracer.output.save()
    tokens.value

The traces are recorded when their blocks end and all run when the session ends, in order, in
one job; a value crosses from one trace to the next without leaving the machine it runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends import Remote
from ..errors import InterventionError

if TYPE_CHECKING:
    from ..remote.job import Job
    from .recording import Recording, TracedModel


class TraceSession:
    def __init__(self, model: TracedModel, remote: Remote = False, blocking: bool = True) -> None:
        self._model = model
        self.remote = model.open_sweep.remote if model.open_sweep is not None else remote  # a job of the sweep
        self.blocking = blocking
        self.recordings: list[Recording] = []  # its traces, in order, as each block ends
        self.job: Job | None = None  # the fabric's job, once submitted

    def __enter__(self) -> TraceSession:
        if self._model.open_session is not None:
            raise RuntimeError("a session on this model is already open; sessions do not nest")
        if self._model.open_recording is not None:
            raise RuntimeError("open the session outside any trace")
        self._model.open_session = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._model.open_session = None
        if exc_type is not None or not self.recordings:
            return
        from .recording import run_recordings

        try:
            run_recordings(self._model, self.recordings, session=True, remote=self.remote, blocking=self.blocking)
            self.job = self.recordings[0].job
        except InterventionError as error:
            raise self.recordings[error.trace or 0].at_user_line(error) from error.__cause__
        finally:
            for recording in self.recordings:
                recording.frame = None
