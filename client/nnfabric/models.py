"""The models a researcher traces: any torch module, or a Hugging Face causal language model.

Usage::

    model = nnfabric.LanguageModel("openai-community/gpt2")      # or a local dir / built model
    with model.trace("The Eiffel Tower is in the city of"):
        hidden = model.transformer.h[5].output[0].save()
    with model.generate("Paris is", max_new_tokens=3) as tracer:
        tokens = tracer.output.save()

    net = nnfabric.Model(torch.nn.Sequential(...))
    with net.trace(torch.randn(2, 4)):
        first = net[0].output.save()
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from . import backends
from .backends import Backend, Edit, Remote
from .graph.tree import ModuleTree
from .tracing.envoy import Envoy
from .tracing.recording import Recording
from .tracing.session import TraceSession
from .tracing.sweep import Sweep
from .tracing.tracer import Tracer

if TYPE_CHECKING:
    from .remote.http import FabricClient as Fabric
    from .tracing.edit import EditBlock


class Model:
    """Wraps a torch module; attribute access mirrors its module tree.

    `remote=` on trace/generate/session picks the backend: False runs here, "local" runs here
    through the wire format (as a job travels), True runs on the fabric.
    """

    def __init__(self, module: Any = None, *, tree: ModuleTree | None = None, fabric: Fabric | None = None) -> None:
        self._module = module
        if tree is None:
            from .runtime.source import module_operations

            tree = ModuleTree.from_module(module, operations=module_operations)
        self._tree = tree
        # Tracing's seam (nnfabric.tracing.recording.TracedModel): the block and session open on it.
        self.open_recording: Recording | None = None
        self.open_session: TraceSession | None = None
        self.open_sweep: Sweep | None = None
        self._envoy = Envoy(self, self._tree)
        self._adapter: Any = None
        self._fabric = fabric
        self._remote_name: str | None = None
        self._paths = frozenset(self._tree.paths())  # what validation checks every graph against
        self._edits: list[Edit] = []  # persistent edits every trace applies first (model.edit())

    # -- the tree --------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._envoy, name)

    def __getitem__(self, index: int) -> Envoy:
        return self._envoy[index]

    def __len__(self) -> int:
        return len(self._envoy)

    def __iter__(self) -> Any:
        return iter(self._envoy)

    def __repr__(self) -> str:
        """A summary line (architecture, where it runs), then every module path with its type."""
        rows = dict(self._summary())
        return f"{type(self).__name__} ({rows['architecture']}): runs {rows['runs']}\n{self._tree.render()}"

    def _summary(self) -> list[tuple[str, str]]:
        """(field, value) rows: what the model is and where its traces run."""
        name = self._remote_name
        if self._module is None:
            where = f"on the fabric at {self._fabric.url}" if self._fabric is not None else "on the fabric"
            runs = f"{where} as {name!r} (remote=True only: no weights here)"
        else:
            param = next(iter(self._module.parameters()), None)
            runs = "here" if param is None else f"here ({param.device}, {str(param.dtype).removeprefix('torch.')})"
            if name:
                runs += f"; with remote=True on the fabric as {name!r}"
        rows = [("architecture", self._tree.type_name), ("runs", runs)]
        if name:
            rows.insert(0, ("name", name))
        return rows

    def _repr_html_(self) -> str:
        from .remote.display import html_table

        tree = html.escape(self._tree.render())
        modules = f"<details><summary>modules ({len(self._paths)} paths)</summary><pre>{tree}</pre></details>"
        return html_table(f"nnfabric {type(self).__name__}", self._summary(), modules)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            setattr(self._envoy, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    def tree(self) -> ModuleTree:
        """The module tree (and each module's operations): what `print(model)` shows."""
        return self._tree

    @property
    def paths(self) -> frozenset[str]:
        """Every module and operation path a graph may name."""
        return self._paths

    @property
    def output(self) -> Any:
        return self._envoy.output

    @property
    def input(self) -> Any:
        return self._envoy.input

    @property
    def inputs(self) -> Any:
        return self._envoy.inputs

    def module_at(self, path: str) -> Any:
        """The torch module at `path`, or None for a model hosted on the fabric."""
        if self._module is None:
            return None
        return self._module.get_submodule(path)

    # -- tracing ---------------------------------------------------------------------------
    def trace(
        self, *inputs: Any, remote: Remote = False, blocking: bool = True, exact: bool = False, **kwargs: Any
    ) -> Tracer:
        """Open a trace: `with model.trace(inputs) as tracer:`; several prompts via tracer.invoke.
        `exact=True` runs the job alone on the fabric (never in a forward pass shared with other
        jobs), so its numbers are bit-identical to a solo run whoever else is queued."""
        options = {"exact": True} if exact else None
        return Tracer(self, inputs, kwargs, kind="trace", options=options, remote=remote, blocking=blocking)

    def scan(self, *inputs: Any, remote: Remote = False, **kwargs: Any) -> Tracer:
        """Like trace(), but the model runs on fake tensors: saved values are meta tensors with
        the shapes and dtypes a trace would see, at no compute cost (`.value.shape`)."""
        return Tracer(self, inputs, kwargs, kind="trace", options={"scan": True}, remote=remote)

    def session(self, remote: Remote = False, blocking: bool = True) -> TraceSession:
        """Several traces as one job: `with model.session(remote=True):` then traces inside;
        later traces may use earlier traces' values directly (no round trip)."""
        return TraceSession(self, remote=remote, blocking=blocking)

    def sweep(self, remote: Remote = True, progress: bool | None = None) -> Sweep:
        """Many traces, each its own job, sent together: `with model.sweep(remote=True) as sweep:`
        then traces inside (recorded as their blocks end); every job has ended, its saved values
        filled in, when the sweep's block ends. One progress bar; `sweep.failed` lists failures."""
        return Sweep(self, remote=remote, progress=progress)

    # -- persistent edits -------------------------------------------------------------------
    def edit(self, *, inplace: bool = False, remote: bool | None = None) -> EditBlock:
        """`with model.edit() as edited:` records writes that every trace of `edited` applies
        first (`inplace=True`: of this model). Remote traces name the edit, registered with the
        fabric for your own jobs (at once with `remote=True`, else on first use)."""
        from .tracing.edit import EditBlock

        return EditBlock(self, inplace, remote if remote is not None else self._module is None)

    def clear_edits(self) -> None:
        """Drop this model object's edits, and their registrations on the fabric."""
        from .remote.config import default_fabric

        for edit in self._edits:
            for (url, name), edit_id in list(edit.registered.items()):
                fabric = self._fabric or default_fabric()
                if fabric.url == url:
                    fabric.remove_edit(name, edit_id)
                del edit.registered[(url, name)]
        self._edits = []

    @property
    def edits(self) -> list[Edit]:
        """This model object's persistent edits, in the order they apply."""
        return list(self._edits)

    def add_edit(self, edit: Edit) -> None:
        """Apply `edit` first in every later trace of this model object (model.edit() calls it)."""
        self._edits.append(edit)

    def with_edits(self) -> Model:
        """A new model object on the same module and tree, with this one's edits so far."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.open_recording = None
        clone.open_session = None
        clone.open_sweep = None
        clone._envoy = Envoy(clone, self._tree)
        clone._edits = list(self._edits)
        return clone

    def invoke_inputs(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """One invoke's inputs as (positional, keyword) inputs of the adapter."""
        return list(inputs), dict(kwargs)

    def forward_keywords(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the invoke's own inputs, keyword arguments for the model's forward): a plain module
        takes every keyword as an input."""
        return dict(kwargs), {}

    def _get_adapter(self) -> Any:
        if self._adapter is None:
            from .runtime.adapters import ModuleAdapter

            self._adapter = ModuleAdapter(self._module)
        return self._adapter

    def backend(self, remote: Remote) -> Backend:
        """Where a trace opened with `remote=` runs (nnfabric.backends.select)."""
        adapter = None if self._module is None else self._get_adapter
        return backends.select(remote, adapter=adapter, paths=self._paths, fabric=self._fabric, name=self._remote_name)


class LanguageModel(Model):
    """A Hugging Face causal LM: `source` is a repo id, a local directory, or a built model."""

    def __init__(
        self,
        source: Any = None,
        tokenizer: Any = None,
        *,
        tree: ModuleTree | None = None,
        remote_name: str | None = None,
        fabric: Fabric | None = None,
        **hf_kwargs: Any,
    ) -> None:
        module = None
        if tree is None:
            if isinstance(source, str):
                from transformers import AutoModelForCausalLM, AutoTokenizer

                module = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
                tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
            else:
                if tokenizer is None:
                    raise ValueError("a model object needs tokenizer=: LanguageModel(model, tokenizer=tok)")
                module = source
            module.train(False)  # inference mode (dropout off)
        super().__init__(module, tree=tree, fabric=fabric)
        self.tokenizer = tokenizer
        # The model's name on the fabric for remote=True (a repo id names itself).
        self._remote_name = remote_name or (source if isinstance(source, str) else None)

    def generate(
        self, *inputs: Any, max_new_tokens: int = 20, remote: Remote = False, blocking: bool = True, **options: Any
    ) -> Tracer:
        """Open a generation trace; `tracer.iter[...]`/`tracer.all()` address its steps. Sampling
        options (do_sample, temperature, top_k, top_p, seed) and `exact=True` (run alone, as for
        a trace) are the fabric's; any other keyword goes to the model's `generate` (e.g.
        repetition_penalty, output_attentions)."""
        from .graph.validate import OPTIONS

        forward = {k: v for k, v in options.items() if k not in OPTIONS}
        options = {"max_new_tokens": max_new_tokens, **{k: v for k, v in options.items() if k in OPTIONS}}
        if not options.get("exact", True):
            del options["exact"]
        if forward:
            options["forward"] = forward
        return Tracer(self, inputs, {}, kind="generate", options=options, remote=remote, blocking=blocking)

    def forward_keywords(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A language model's inputs are input_ids/attention_mask; any other keyword is for its
        forward (output_attentions=True, ...)."""
        inputs = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")}
        return inputs, {k: v for k, v in kwargs.items() if k not in inputs}

    def invoke_inputs(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """One invoke's inputs as (positional, keyword) inputs of the adapter."""
        if len(inputs) == 1 and isinstance(inputs[0], dict) and not kwargs:
            return [], dict(inputs[0])
        if kwargs and not inputs:
            return [], dict(kwargs)
        if len(inputs) != 1:
            raise ValueError("pass one input per invoke: text, a list of texts, token ids, or a dict of tensors")
        return [inputs[0]], {}

    def _get_adapter(self) -> Any:
        if self._adapter is None:
            from .runtime.adapters import CausalLMAdapter

            self._adapter = CausalLMAdapter(self._module, self.tokenizer)
        return self._adapter
