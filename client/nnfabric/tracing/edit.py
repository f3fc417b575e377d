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
from .tracer import Tracer

if TYPE_CHECKING:
    from ..models import Model
    from .proxy import Proxy


class _EditRecorder(Tracer):
    """Records an edit's graph: a trace with no inputs that keeps no values and never runs alone."""

    def _save(self, proxy: Proxy) -> None:
        raise ValueError("an edit keeps no values: .save() belongs in the traces that use the edited model")


class EditBlock:
    def __init__(self, model: Model, inplace: bool, remote: bool) -> None:
        self._model = model
        self._inplace = inplace
        self._remote = remote
        self._target: Model | None = None
        self._recorder: _EditRecorder | None = None

    def __enter__(self) -> Model:
        model = self._model
        if model._tracer is not None:
            raise RuntimeError("a trace on this model is open; record edits outside it")
        target = model if self._inplace else model._with_edits()
        recorder = _EditRecorder(model, (), {}, kind="trace")
        recorder._frame = sys._getframe(1)
        recorder._active = True
        model._tracer = recorder
        target._tracer = recorder  # writes recorded on either object belong to the edit
        self._target, self._recorder = target, recorder
        return target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        model, target, recorder = self._model, self._target, self._recorder
        assert target is not None and recorder is not None
        model._tracer = None
        target._tracer = None
        recorder._active = False
        if exc_type is not None:
            return
        graph = recorder._graph
        try:
            if not graph.invokes:
                raise GraphError("the edit is empty: assign to a module's .output/.input inside model.edit()")
            check_edit(graph)
            validate_graph(graph, Limits.local(), tensor_names=set(recorder._tensors), module_paths=model._paths)
        except GraphError as error:
            line = graph.nodes[error.node].line if error.node is not None and error.node < len(graph.nodes) else None
            raise recorder._at_user_line(InterventionError(str(error), line, error.node)) from None
        finally:
            recorder._frame = None
        edit = Edit(graph, dict(recorder._tensors))
        target._edits.append(edit)
        if self._remote:
            backend: Any = target._backend(True)
            backend.register(edit)
