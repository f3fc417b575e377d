"""High-level requests compiled into ordinary intervention graphs (torch-free), so they get the
same validation, limits, queueing and batching as any job.

Usage::

    header, blob = activations_job("gpt2", ["Paris is"], ["transformer.h.3"], positions=[-1])
    header, blob = generation_job("gpt2", ["Paris is"], max_tokens=8, sampling={}, interventions=[...])
    text = Detokenizer(tokenizer_files).completion(row, prompt_width, eos_ids)

An intervention (the `nnfabric` extension of the OpenAI-compatible routes) adds a vector to a
module's output while generating: `{"module": "transformer.h.6", "add": [...], "scale": 1.0,
"position": "last" | "all", "steps": "all" | [0, 1]}`, exactly what
`model.transformer.h[6].output[:, -1] += vector` inside `tracer.all()` does in Python.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from nnfabric.graph.codec import graph_to_json
from nnfabric.graph.ir import SCHEMA, Graph, Invoke, Node, Ref, TensorRef
from nnfabric.graph.json_form import tensors_to_safetensors
from nnfabric.graph.validate import GraphError, Limits
from pydantic import BaseModel, Field, model_validator

_LAST = (slice(None), -1)


class SavedValue(BaseModel):
    """A value an earlier job of yours saved: its job id and its name (or result key)."""

    job: str = Field(max_length=64)
    value: str = Field(max_length=200)


class Intervention(BaseModel):
    """Add `scale * vector` to `module`'s output at the last position (or all), at some steps;
    the vector is given (`add`) or one an earlier job saved (`saved`)."""

    module: str = Field(max_length=200)
    add: list[float] | None = Field(None, min_length=1, max_length=1 << 16)
    saved: SavedValue | None = None
    scale: float = 1.0
    position: str = Field("last", pattern="^(last|all)$")
    steps: list[int] | str = "all"

    @model_validator(mode="after")
    def _one_vector(self) -> Intervention:
        if (self.add is None) == (self.saved is None):
            raise ValueError("give the vector as `add` (numbers) or `saved` ({job, value}), one of the two")
        return self


class Extension(BaseModel):
    interventions: list[Intervention] = Field(default_factory=list, max_length=32)
    exact: bool = Field(False, description="run alone: bit-identical to a solo run, whoever else is queued")


def _job(model: str, graph: Graph, tensors: dict[str, list[float]], limits: Limits) -> tuple[dict[str, Any], bytes]:
    blob = tensors_to_safetensors(
        {name: {"dtype": "float32", "shape": [len(values)], "data": _f32(values)} for name, values in tensors.items()},
        limits,
    )
    return {"schema": SCHEMA, "model": model, "graph": graph_to_json(graph)}, blob


def _f32(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def activations_job(
    model: str, prompts: list[str], modules: list[str], positions: list[int] | None, limits: Limits
) -> tuple[dict[str, Any], bytes]:
    """One invoke per prompt; each module's output (at `positions`, if given) saved, named
    "prompt.module"."""
    graph = Graph(kind="trace")
    names: dict[str, str] = {}
    for index, prompt in enumerate(prompts):
        graph.invokes.append(Invoke(args=[prompt]))
        for path in modules:
            node = graph.add(Node("output", [path, 0, 0], invoke=index))
            if positions is not None:
                node = graph.add(Node("getitem", [Ref(node.id), (slice(None), list(positions))], invoke=index))
            graph.saves.append(node.id)
            names[f"{index}.{path}"] = str(node.id)
    header, blob = _job(model, graph, {}, limits)
    header["names"] = names
    return header, blob


def generation_job(
    model: str,
    prompts: list[str],
    max_tokens: int,
    sampling: dict[str, Any],
    interventions: list[Intervention],
    limits: Limits,
) -> tuple[dict[str, Any], bytes]:
    """A generation over `prompts` (one invoke, one batch) with the interventions applied; saves
    the generated token ids (prompt and continuation, as `model.generate` returns them)."""
    graph = Graph(kind="generate", options={"max_new_tokens": max_tokens, **sampling})
    graph.invokes.append(Invoke(args=[list(prompts)]))
    tensors: dict[str, list[float]] = {}
    for number, edit in enumerate(interventions):
        name = f"v{number}"
        if edit.add is None:
            raise GraphError(f"intervention {number}: its saved vector was not resolved")
        tensors[name] = [value * edit.scale for value in edit.add]
        if edit.steps == "all":
            steps, optional = list(range(max_tokens)), True
        elif isinstance(edit.steps, list) and all(0 <= s < max_tokens for s in edit.steps):
            steps, optional = sorted(set(edit.steps)), False
        else:
            raise GraphError(f"intervention {number}: steps must be 'all' or a list of steps in 0..{max_tokens - 1}")
        for step in steps:
            out = graph.add(Node("output", [edit.module, step, 0], optional=optional))
            if edit.position == "last":
                last = graph.add(Node("getitem", [Ref(out.id), _LAST], optional=optional))
                added = graph.add(Node("binary", ["add", Ref(last.id), TensorRef(name)], optional=optional))
                graph.add(Node("setitem", [Ref(out.id), _LAST, Ref(added.id)], optional=optional))
            else:
                added = graph.add(Node("binary", ["add", Ref(out.id), TensorRef(name)], optional=optional))
                graph.add(Node("set_output", [edit.module, step, 0, Ref(added.id)], optional=optional))
    ids = graph.add(Node("model_output", []))
    graph.saves.append(ids.id)
    return _job(model, graph, tensors, limits)


class Detokenizer:
    """The model's own tokenizer (its published files), for counting and decoding tokens."""

    def __init__(self, files: dict[str, str]) -> None:
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise GraphError("this model publishes no tokenizer.json; its completions cannot be decoded here")
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", "{}"))
        self.chat_template: str | None = config.get("chat_template")
        special = {k: config.get(k) for k in ("eos_token", "bos_token", "pad_token")}
        self.special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in special.items()}
        eos = self.special.get("eos_token")
        self.eos_id = self.tokenizer.token_to_id(eos) if isinstance(eos, str) else None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def completion(self, row: list[int], prompt_width: int, pad_id: int | None) -> tuple[str, int, str]:
        """(text, tokens, finish reason) of one generated row after its (padded) prompt."""
        new = row[prompt_width:]
        finish = "length"
        if self.eos_id is not None and self.eos_id in new:
            new = new[: new.index(self.eos_id)]
            finish = "stop"
        elif pad_id is not None and new and new[-1] == pad_id and pad_id == self.eos_id:
            finish = "stop"
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new), finish

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model was trained to read it (its chat template), ending where
        the assistant's turn begins; a plain "role: content" transcript if it has no template."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join([*lines, "assistant:"])
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise GraphError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=True, **self.special)


def vector_of(value: Any, where: str) -> list[float]:
    """A saved value (JSON tensor form) as the numbers of a steering vector."""
    formats = {"float32": "f", "float64": "d", "float16": "e"}
    if not isinstance(value, dict) or value.get("dtype") not in formats:
        raise GraphError(f"{where}: the saved value is not a floating-point tensor")
    count = 1
    for size in value["shape"]:
        count *= size
    if not 1 <= count <= 1 << 16:
        raise GraphError(f"{where}: a steering vector needs 1..65536 numbers, the saved value has {count}")
    return list(struct.unpack(f"<{count}{formats[value['dtype']]}", base64.b64decode(value["data"])))
