"""`with model.edit() as edited:`: record writes once; every later trace of `edited` applies them.

Usage::

    with model.edit() as ablated:                       # a new model object; `model` is unchanged
        model.transformer.h[0].mlp.output[:] = 0        # record on either object
    with ablated.trace("Hello"):                        # runs with the MLP zeroed
        logits = ablated.output.logits.save()
    with model.edit(inplace=True):                      # edit `model` itself
        ...
    model.clear_edits()

Remotely the edit is registered with the fabric for this user's jobs on the model (once, on
first use, or at once with `remote=True`); other users never see it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..backends import Edit
from ..errors import InterventionError
from ..graph.edits import check_edit
from ..graph.validate import GraphError, Limits, validate_graph
from .recording import Recording

if TYPE_CHECKING:
    from ..models import Model


class EditBlock:
    def __init__(self, model: Model, inplace: bool, remote: bool) -> None:
        self._model = model
        self._inplace = inplace
        self._remote = remote
        self._target: Model | None = None
        # An edit is recorded as a trace is (the same recording, opened and closed the same
        # way), but one with no inputs that keeps no values and never runs alone.
        self._recording = Recording(model, "trace", keeps_values=False)

    def __enter__(self) -> Model:
        model = self._model
        if model.open_recording is not None:
            raise RuntimeError("a trace on this model is open; record edits outside it")
        target = model if self._inplace else model.with_edits()
        # Writes recorded on either object belong to the edit.
        self._recording.open(sys._getframe(1), *([] if target is model else [target]))
        self._target = target
        return target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        model, target, recording = self._model, self._target, self._recording
        assert target is not None
        recording.close(*([] if target is model else [target]))
        if exc_type is not None:
            return
        graph = recording.graph
        try:
            if not graph.invokes:
                raise GraphError("the edit is empty: assign to a module's .output/.input inside model.edit()")
            check_edit(graph)
            validate_graph(graph, Limits.local(), tensor_names=set(recording.tensors), module_paths=model.paths)
        except GraphError as error:
            line = graph.nodes[error.node].line if error.node is not None and error.node < len(graph.nodes) else None
            raise recording.at_user_line(InterventionError(str(error), line, error.node)) from None
        finally:
            recording.frame = None
        edit = Edit(graph, dict(recording.tensors))
        target.add_edit(edit)
        if self._remote:
            backend: Any = target.backend(True)
            backend.register(edit)
