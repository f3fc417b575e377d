"""The wire format: a versioned JSON header plus a safetensors blob, in one binary envelope.

Usage::

    data = encode_graph(graph, tensor_blob)
    graph, blob = decode_graph(data, Limits())      # raises GraphError on anything malformed

Layout: b"NNFB" | header length (8 bytes, little endian) | UTF-8 JSON header | safetensors blob.
The same envelope carries results (schema ``nnfabric.result/1``). Never pickle.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from .bounded_json import parse_json
from .ir import RESULT_SCHEMA, SCHEMA, DType, Graph, Invoke, MetaTensor, Node, Ref, SourceLine, TensorRef
from .tensor_blob import check_safetensors
from .validate import GraphError, LimitExceeded, Limits, validate_session

MAGIC = b"NNFB"
_PREFIX = len(MAGIC) + 8

__all__ = [
    "GraphError",
    "Limits",
    "decode_graph",
    "decode_request",
    "decode_result",
    "decode_value",
    "encode_graph",
    "graphs_from_header",
    "encode_result",
    "encode_session",
    "encode_value",
    "split_envelope",
    "validate_request",
]


def encode_value(value: Any) -> Any:
    """Python value (with Ref/TensorRef/DType) -> JSON-compatible data."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Ref):
        return {"$ref": value.id}
    if isinstance(value, TensorRef):
        return {"$tensor": value.name}
    if isinstance(value, DType):
        return {"$dtype": value.name}
    if isinstance(value, MetaTensor):
        return {"$meta": {"dtype": value.dtype, "shape": list(value.shape)}}
    if isinstance(value, slice):
        return {"$slice": [encode_value(value.start), encode_value(value.stop), encode_value(value.step)]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise GraphError("dictionary keys in a graph must be strings")
        return {"$dict": {k: encode_value(v) for k, v in value.items()}}
    raise GraphError(f"a value of type {type(value).__name__} cannot be part of a graph")


_TAGS = {"$ref", "$tensor", "$dtype", "$slice", "$ellipsis", "$tuple", "$dict", "$float"}
_PLAIN = frozenset({int, str, float})


def decode_value(data: Any, depth: int = 0, max_depth: int = 32, results: bool = False) -> Any:
    """JSON data -> Python value. Rejects anything not produced by `encode_value`; a tensor's
    shape without data (`$meta`) only in results."""
    if depth > max_depth:
        raise GraphError(f"values are nested deeper than the limit of {max_depth}")
    if data is None or isinstance(data, (bool, int, str)):
        return data
    if isinstance(data, float):
        return data
    if isinstance(data, list):
        if all(type(v) in _PLAIN for v in data):
            return data  # token ids, numbers, texts: already the values they stand for
        return [decode_value(v, depth + 1, max_depth, results) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise GraphError(f"malformed value: {_short(data)}")
    ((tag, body),) = data.items()
    if tag not in _TAGS and not (results and tag == "$meta"):
        raise GraphError(f"unknown value tag {tag!r}")
    if tag == "$meta":
        shape = body.get("shape") if isinstance(body, dict) else None
        dtype = body.get("dtype") if isinstance(body, dict) else None
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise GraphError("a $meta value needs {dtype, shape}")
        return MetaTensor(dtype, tuple(shape))
    if tag == "$ref":
        if not isinstance(body, int) or isinstance(body, bool) or body < 0:
            raise GraphError(f"a node reference must be a non-negative integer, got {_short(body)}")
        return Ref(body)
    if tag in ("$tensor", "$dtype"):
        if not isinstance(body, str):
            raise GraphError(f"{tag} must name a string, got {_short(body)}")
        return TensorRef(body) if tag == "$tensor" else DType(body)
    if tag == "$float":
        if body not in ("nan", "inf", "-inf"):
            raise GraphError(f"unknown special float {_short(body)}")
        return float(body)
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$slice":
        if not isinstance(body, list) or len(body) != 3:
            raise GraphError("a slice needs [start, stop, step]")
        parts = [decode_value(v, depth + 1, max_depth, results) for v in body]
        if not all(p is None or (isinstance(p, (int, Ref)) and not isinstance(p, bool)) for p in parts):
            raise GraphError("slice bounds must be integers, node references or null")
        return slice(*parts)
    if tag == "$tuple":
        if not isinstance(body, list):
            raise GraphError("a tuple needs a list of items")
        return tuple(decode_value(v, depth + 1, max_depth, results) for v in body)
    # $dict
    if not isinstance(body, dict):
        raise GraphError("a dict needs an object body")
    return {str(k): decode_value(v, depth + 1, max_depth, results) for k, v in body.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_envelope(header: dict[str, Any], blob: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + blob


def split_envelope(data: bytes, limits: Limits | None = None) -> tuple[dict[str, Any], bytes]:
    """Envelope bytes -> (header, safetensors blob), checking framing and sizes only."""
    limits = limits or Limits()
    if len(data) < _PREFIX or data[: len(MAGIC)] != MAGIC:
        raise GraphError("not an nnfabric envelope (bad magic bytes)")
    (size,) = struct.unpack("<Q", data[len(MAGIC) : _PREFIX])
    if size > limits.max_header_bytes:
        raise LimitExceeded(f"header of {size} bytes exceeds the limit of {limits.max_header_bytes}")
    if _PREFIX + size > len(data):
        raise GraphError("envelope is truncated: header runs past the end")
    header = parse_json(data[_PREFIX : _PREFIX + size], limits)
    if not isinstance(header, dict):
        raise GraphError("header must be a JSON object")
    return header, data[_PREFIX + size :]


def _line_json(line: SourceLine | None) -> Any:
    return None if line is None else {"file": line.file, "line": line.line, "code": line.code}


def graph_to_json(graph: Graph) -> dict[str, Any]:
    return {
        "kind": graph.kind,
        "nodes": [
            {
                "op": n.op,
                "args": [encode_value(a) for a in n.args],
                "kwargs": {k: encode_value(v) for k, v in n.kwargs.items()},
                "invoke": n.invoke,
                "line": _line_json(n.line),
                **({"optional": True} if n.optional else {}),
                **({"unordered": True} if n.unordered else {}),
            }
            for n in graph.nodes
        ],
        "invokes": [
            {
                "args": None if i.args is None else [encode_value(a) for a in i.args],
                "kwargs": {k: encode_value(v) for k, v in i.kwargs.items()},
            }
            for i in graph.invokes
        ],
        "saves": list(graph.saves),
        "options": {k: encode_value(v) for k, v in graph.options.items()},
    }


def encode_graph(graph: Graph, blob: bytes, extra: dict[str, Any] | None = None) -> bytes:
    header = {"schema": SCHEMA, "graph": graph_to_json(graph), **(extra or {})}
    return encode_envelope(header, blob)


def encode_session(graphs: list[Graph], blob: bytes, extra: dict[str, Any] | None = None) -> bytes:
    """Several traces as one job; later ones may use earlier ones' values (op `from_trace`)."""
    header = {"schema": SCHEMA, "session": [graph_to_json(g) for g in graphs], **(extra or {})}
    return encode_envelope(header, blob)


def graphs_from_header(header: dict[str, Any], limits: Limits) -> list[Graph]:
    """A request header's traces: its one `graph`, or its `session` of several."""
    if "session" not in header:
        return [graph_from_json(header.get("graph"), limits)]
    session = header["session"]
    _expect(isinstance(session, list) and len(session) >= 1, "session must be a non-empty list of graphs")
    if len(session) > limits.max_traces:
        raise LimitExceeded(f"a session holds at most {limits.max_traces} traces, this one has {len(session)}")
    graphs = []
    for index, data in enumerate(session):
        try:
            graphs.append(graph_from_json(data, limits))
        except GraphError as exc:
            raise type(exc)(f"trace {index}: {exc}", exc.node, index) from None
    return graphs


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise GraphError(message)


def _node_from_json(index: int, nd: Any, depth: int, lines: dict[tuple[str, int, str], SourceLine]) -> Node:
    """Node `index` of a graph, checked as it is decoded."""
    # (each message is formatted only when its check fails: this runs for every node of every job)
    if not isinstance(nd, dict):
        raise GraphError(f"node {index} must be an object")
    op, args, kwargs = nd.get("op"), nd.get("args", []), nd.get("kwargs", {})
    if not isinstance(op, str):
        raise GraphError(f"node {index}: op must be a string")
    if not isinstance(args, list):
        raise GraphError(f"node {index}: args must be a list")
    if not isinstance(kwargs, dict):
        raise GraphError(f"node {index}: kwargs must be an object")
    invoke = nd.get("invoke", 0)
    if type(invoke) is not int:
        raise GraphError(f"node {index}: invoke must be an integer")
    line = nd.get("line")
    source = None
    if line is not None:
        if not (
            isinstance(line, dict)
            and isinstance(line.get("file"), str)
            and type(line.get("line")) is int
            and isinstance(line.get("code", ""), str)
        ):
            raise GraphError(f"node {index}: malformed source line")
        where = (line["file"][:500], line["line"], line.get("code", "")[:500])
        source = lines.get(where) or lines.setdefault(where, SourceLine(*where))
    try:
        node = Node(
            op=op,
            args=[decode_value(a, 1, depth) for a in args],
            kwargs={str(k): decode_value(v, 1, depth) for k, v in kwargs.items()},
            invoke=invoke,
            line=source,
            optional=bool(nd.get("optional", False)),
            unordered=bool(nd.get("unordered", False)),
        )
    except GraphError as exc:
        raise GraphError(f"node {index} ({op}): {exc}") from None
    return node


def graph_from_json(data: Any, limits: Limits) -> Graph:
    _expect(isinstance(data, dict), "graph must be an object")
    kind = data.get("kind")
    _expect(kind in ("trace", "generate"), f"graph kind must be 'trace' or 'generate', got {_short(kind)}")
    nodes_data = data.get("nodes")
    _expect(isinstance(nodes_data, list), "graph.nodes must be a list")
    if len(nodes_data) > limits.max_nodes:
        raise LimitExceeded(f"graph has {len(nodes_data)} nodes, over the limit of {limits.max_nodes}")
    depth = limits.max_depth
    graph = Graph(kind=kind)
    lines: dict[tuple[str, int, str], SourceLine] = {}  # a step's nodes repeat their lines
    for index, nd in enumerate(nodes_data):
        graph.add(_node_from_json(index, nd, depth, lines))
    invokes = data.get("invokes")
    _expect(isinstance(invokes, list) and len(invokes) >= 1, "graph.invokes must be a non-empty list")
    if len(invokes) > limits.max_invokes:
        raise LimitExceeded(f"graph has {len(invokes)} invokes, over the limit of {limits.max_invokes}")
    for index, inv in enumerate(invokes):
        _expect(isinstance(inv, dict), f"invoke {index} must be an object")
        args = inv.get("args")
        kwargs = inv.get("kwargs", {})
        _expect(args is None or isinstance(args, list), f"invoke {index}: args must be a list or null")
        _expect(isinstance(kwargs, dict), f"invoke {index}: kwargs must be an object")
        graph.invokes.append(
            Invoke(
                args=None if args is None else [decode_value(a, 1, depth) for a in args],
                kwargs={str(k): decode_value(v, 1, depth) for k, v in kwargs.items()},
            )
        )
    saves = data.get("saves", [])
    _expect(
        isinstance(saves, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in saves),
        "graph.saves must be a list of node ids",
    )
    graph.saves = list(saves)
    options = data.get("options", {})
    _expect(isinstance(options, dict), "graph.options must be an object")
    graph.options = {str(k): decode_value(v, 1, depth) for k, v in options.items()}
    return graph


def decode_request(
    data: bytes, limits: Limits, module_paths: set[str] | frozenset[str] | None = None
) -> tuple[list[Graph], bytes]:
    """Envelope bytes -> validated ([Graph, ...], safetensors blob): one graph, or a session's.
    Raises GraphError (LimitExceeded for sizes), never anything else."""
    if len(data) > limits.max_envelope_bytes:
        raise LimitExceeded(f"envelope of {len(data)} bytes exceeds the limit of {limits.max_envelope_bytes}")
    header, blob = split_envelope(data, limits)
    return validate_request(header, blob, limits, module_paths), blob


def validate_request(
    header: dict[str, Any], blob: bytes, limits: Limits, module_paths: set[str] | frozenset[str] | None = None
) -> list[Graph]:
    """The one validation of a request, after `split_envelope`: schema version, graphs, tensor
    blob, every node against the registry and the model's module paths. The gateway, the worker
    and the loopback backend all come through here."""
    schema = header.get("schema")
    if schema != SCHEMA:
        raise GraphError(version_message(schema, SCHEMA))
    graphs = graphs_from_header(header, limits)
    tensors = check_safetensors(blob, limits)
    validate_session(graphs, limits, tensor_names=set(tensors), module_paths=module_paths)
    return graphs


def decode_graph(data: bytes, limits: Limits | None = None) -> tuple[Graph, bytes]:
    """Envelope bytes of a single trace -> validated (Graph, safetensors blob)."""
    graphs, blob = decode_request(data, limits or Limits())
    if len(graphs) != 1:
        raise GraphError(f"expected one graph, got a session of {len(graphs)}")
    return graphs[0], blob


def version_message(got: Any, want: str) -> str:
    """Say which side to upgrade when two ends speak different schema versions."""
    if not isinstance(got, str) or not got.startswith(want.rsplit("/", 1)[0] + "/"):
        return f"unknown schema {_short(got)}; expected {want!r}"
    try:
        theirs = int(got.rsplit("/", 1)[1])
        ours = int(want.rsplit("/", 1)[1])
    except ValueError:
        return f"unknown schema {_short(got)}; expected {want!r}"
    side = "this side (pip install -U nnfabric)" if theirs > ours else "the sender"
    return f"schema version {got!r} is not supported here ({want!r}); upgrade {side}"


def encode_result(values: dict[str, Any], blob: bytes, extra: dict[str, Any] | None = None) -> bytes:
    header = {"schema": RESULT_SCHEMA, "values": {k: encode_value(v) for k, v in values.items()}, **(extra or {})}
    return encode_envelope(header, blob)


def decode_result(data: bytes, limits: Limits | None = None) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """Result envelope -> (values with TensorRefs, safetensors blob, the whole header)."""
    limits = limits or Limits.local()
    header, blob = split_envelope(data, limits)
    if header.get("schema") != RESULT_SCHEMA:
        raise GraphError(version_message(header.get("schema"), RESULT_SCHEMA))
    raw = header.get("values")
    if not isinstance(raw, dict):
        raise GraphError("result.values must be an object")
    check_safetensors(blob, limits)
    return {k: decode_value(v, 0, 64, results=True) for k, v in raw.items()}, blob, header
