"""JSON Schema of the graph, of a job in its JSON form and of a JSON result, built from the IR's
own constants and the op registry, so it cannot drift from what the validator accepts.

Usage::

    document = schema_document()                       # {"$defs": {...}, "ops": {...}}: GET /v1/schema
    defs = schema_defs("#/components/schemas/")        # the same definitions, for OpenAPI

`tests/integration/test_http_api.py` validates real encoded graphs against it and checks docs/schema.json.
"""

from __future__ import annotations

from typing import Any

from .ir import RESULT_SCHEMA, SCHEMA
from .ops import DTYPES, OPS
from .validate import OPTIONS

_ADVANCED = {"$float": ["nan", "inf", "-inf"]}


def schema_defs(prefix: str = "#/$defs/") -> dict[str, Any]:
    """Every definition, each referring to the others under `prefix`."""

    def ref(name: str) -> dict[str, str]:
        return {"$ref": prefix + name}

    def tagged(tag: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {tag: body}, "required": [tag], "additionalProperties": False}

    value = {
        "description": "A literal, or a tagged object: a reference to an earlier node, a tensor carried "
        "beside the graph, a dtype, a slice, Ellipsis, a tuple, a dict, or a non-finite float.",
        "anyOf": [
            {"type": ["null", "boolean", "integer", "number", "string"]},
            {"type": "array", "items": ref("Value")},
            tagged("$ref", {"type": "integer", "minimum": 0, "description": "an earlier node's id"}),
            tagged("$tensor", {"type": "string", "description": "a tensor's name in `tensors`"}),
            tagged("$dtype", {"enum": sorted(DTYPES)}),
            tagged("$slice", {"type": "array", "items": ref("Value"), "minItems": 3, "maxItems": 3}),
            tagged("$ellipsis", {"const": True}),
            tagged("$tuple", {"type": "array", "items": ref("Value")}),
            tagged("$dict", {"type": "object", "additionalProperties": ref("Value")}),
            tagged("$float", {"enum": _ADVANCED["$float"]}),
        ],
    }
    line = {
        "type": ["object", "null"],
        "description": "the user's line that recorded the node (errors point at it)",
        "properties": {"file": {"type": "string"}, "line": {"type": "integer"}, "code": {"type": "string"}},
        "required": ["file", "line"],
    }
    node = {
        "type": "object",
        "description": "One operation. `op` names an entry of the op table (`ops`); module events take "
        "args [path, generation step, call index(, value)].",
        "properties": {
            "op": {"enum": sorted(OPS)},
            "args": {"type": "array", "items": ref("Value")},
            "kwargs": {"type": "object", "additionalProperties": ref("Value")},
            "invoke": {"type": "integer", "minimum": 0, "description": "its batch group"},
            "line": line,
            "optional": {"type": "boolean", "description": "a generation step that may not happen"},
            "unordered": {"type": "boolean", "description": "a module read that need not wait for earlier nodes"},
        },
        "required": ["op"],
    }
    invoke = {
        "type": "object",
        "description": "One batch group: `args` its inputs (a prompt, prompts or token ids), or null for "
        "the whole batch.",
        "properties": {
            "args": {"type": ["array", "null"], "items": ref("Value")},
            "kwargs": {"type": "object", "additionalProperties": ref("Value")},
        },
    }
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object"}
    options = {
        name: {"type": sorted({kinds[t] for t in (types if isinstance(types, tuple) else (types,))})}
        for name, types in OPTIONS.items()
    }
    graph = {
        "type": "object",
        "description": f"An intervention graph ({SCHEMA}): nodes in program order; a reference always "
        "points to an earlier node.",
        "properties": {
            "kind": {"enum": ["trace", "generate"]},
            "nodes": {"type": "array", "items": ref("Node")},
            "invokes": {"type": "array", "items": ref("Invoke"), "minItems": 1},
            "saves": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "options": {"type": "object", "properties": options, "additionalProperties": False},
        },
        "required": ["kind", "nodes", "invokes"],
    }
    tensor = {
        "type": "object",
        "description": "A tensor: its dtype, shape, and its little-endian bytes (row-major) in base64.",
        "properties": {
            "dtype": {"enum": sorted(DTYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "string", "contentEncoding": "base64"},
        },
        "required": ["dtype", "shape", "data"],
        "additionalProperties": False,
    }
    job = {
        "type": "object",
        "description": "A job in JSON: one graph, or a session of several run in order (a later one may "
        "use an earlier one's values with op `from_trace`).",
        "properties": {
            "schema": {"const": SCHEMA},
            "model": {"type": "string", "description": "a catalog name (GET /v1/models)"},
            "graph": ref("Graph"),
            "session": {"type": "array", "items": ref("Graph"), "minItems": 1},
            "tensors": {"type": "object", "additionalProperties": ref("Tensor")},
            "names": {
                "type": "object",
                "description": "your names for saved values: name -> result key (a node id, or 'trace.node')",
                "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            },
            "edits": {
                "type": "array",
                "items": {"type": "string"},
                "maxItems": 16,
                "description": "ids of your persistent edits on this model (POST /v1/models/{name}/edits), "
                "applied first in every trace",
            },
        },
        "required": ["model"],
        "oneOf": [{"required": ["graph"]}, {"required": ["session"]}],
        "additionalProperties": False,
    }
    result = {
        "type": "object",
        "description": f"A job's saved values ({RESULT_SCHEMA}) in JSON: by result key (a node id, or "
        "'trace.node' in a session); tensors as Tensor objects, tuples as arrays, dtypes by name, "
        "non-finite floats as 'NaN', 'Infinity', '-Infinity'; a scan's tensors (option `scan`) as {dtype, shape} "
        "without data.",
        "properties": {
            "values": {"type": "object", "additionalProperties": True},
            "names": {"type": "object", "additionalProperties": True},
        },
        "required": ["values"],
    }
    return {"Value": value, "Node": node, "Invoke": invoke, "Graph": graph, "Tensor": tensor,
            "JobJSON": job, "ResultJSON": result}  # fmt: skip


def op_table() -> dict[str, Any]:
    """Each op: how many positional arguments, and the names its name argument may take."""
    table: dict[str, Any] = {}
    for name, spec in sorted(OPS.items()):
        entry: dict[str, Any] = {"min_args": spec.min_args, "max_args": spec.max_args}
        if spec.name_arg is not None:
            entry["name_arg"] = spec.name_arg
            entry["names"] = sorted(spec.names)
        if spec.module_event:
            entry["module_event"] = True
        table[name] = entry
    return table


def schema_document() -> dict[str, Any]:
    """The whole published schema (GET /v1/schema, docs/schema.json)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA,
        "title": "nnfabric intervention graphs, jobs and results",
        "version": {"graph": SCHEMA, "result": RESULT_SCHEMA},
        "$defs": schema_defs(),
        "ops": op_table(),
        "kwargs": "any keyword a method or function takes, except `out`",
    }
