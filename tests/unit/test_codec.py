"""The wire codec: round trips, and clean rejection of anything malformed or over the limits."""

import contextlib
import json
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nnfabric.graph import SCHEMA, Graph, GraphError, Invoke, Limits, Node, Ref, decode_graph, encode_graph
from nnfabric.graph.codec import MAGIC, decode_value, encode_value, graph_to_json


def small_graph() -> Graph:
    g = Graph()
    g.invokes.append(Invoke(args=["hello"]))
    g.add(Node("output", ["transformer.h.0", 0, 0]))
    g.add(Node("getitem", [Ref(0), (slice(None), -1, Ellipsis)]))
    g.add(Node("call_method", ["softmax", Ref(1), -1]))
    g.saves.append(2)
    return g


def envelope(header: dict, blob: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + blob


def test_round_trip_keeps_every_field():
    g = small_graph()
    decoded, blob = decode_graph(encode_graph(g, b""))
    assert graph_to_json(decoded) == graph_to_json(g)
    assert blob == b""


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "x", [1, [2]], (1, (2, 3)), {"a": (1,)}, slice(1, None, 2), Ellipsis, float("inf")],
)
def test_values_round_trip(value):
    assert decode_value(encode_value(value)) == value


def header_with(**changes) -> dict:
    header = {"schema": SCHEMA, "graph": graph_to_json(small_graph())}
    header["graph"].update(changes)
    return header


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"schema": "nnfabric.graph/9", "graph": {}}, "upgrade this side"),
        ({"schema": "nnfabric.graph/0", "graph": {}}, "upgrade the sender"),
        ({"schema": "other", "graph": {}}, "unknown schema"),
        (header_with(nodes=[{"op": "exec", "args": []}]), "unknown op 'exec'"),
        (header_with(nodes=[{"op": "call_method", "args": ["__reduce__", 1]}]), "not an allowed call_method"),
        (header_with(nodes=[{"op": "call_function", "args": ["os.system", "ls"]}]), "not an allowed call_function"),
        (header_with(nodes=[{"op": "getitem", "args": [{"$ref": 5}, 0]}]), "not earlier in the graph"),
        (header_with(nodes=[{"op": "getitem", "args": [{"$ref": 0}, 0]}]), "forward references and cycles"),
        (header_with(nodes=[{"op": "getattr", "args": [1, "__class__"]}]), "may not be read"),
        (header_with(nodes=[{"op": "output", "args": ["x", -1, 0]}]), "non-negative"),
        (header_with(nodes=[{"op": "literal", "args": [{"$pickle": "..."}]}]), "unknown value tag"),
        (header_with(nodes=[{"op": "literal", "args": [{"$tensor": "missing"}]}]), "not in the blob"),
        (header_with(nodes=[{"op": "literal", "args": [{"$dtype": "object"}]}]), "unknown dtype"),
        (header_with(invokes=[]), "non-empty"),
        (header_with(saves=[99]), "does not exist"),
        (header_with(kind="eval"), "kind"),
        (header_with(options={"evil": 1}), "unknown option"),
    ],
)
def test_malformed_graphs_are_rejected_with_a_reason(header, message):
    with pytest.raises(GraphError, match=message):
        decode_graph(envelope(header))


def test_limits_are_enforced():
    g = small_graph()
    with pytest.raises(GraphError, match="over the limit of 2"):
        decode_graph(encode_graph(g, b""), Limits(max_nodes=2))
    nested: list = []
    for _ in range(50):
        nested = [nested]
    deep = header_with(nodes=[{"op": "literal", "args": [nested]}])
    with pytest.raises(GraphError, match="nested deeper"):
        decode_graph(envelope(deep))
    import torch
    from safetensors.torch import save

    blob = save({"t0": torch.zeros(1000)})
    with pytest.raises(GraphError, match="exceed the limit"):
        decode_graph(encode_graph(g, blob), Limits(max_tensor_bytes=100))


def test_generation_length_is_limited():
    g = small_graph()
    g.kind = "generate"
    g.options = {"max_new_tokens": 5000}
    with pytest.raises(GraphError, match="max_new_tokens"):
        decode_graph(encode_graph(g, b""), Limits(max_new_tokens=100))


def test_corrupt_tensor_blob_is_rejected():
    head = json.dumps({"t0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}).encode()
    blob = struct.pack("<Q", len(head)) + head + b"\0" * 16
    with pytest.raises(GraphError, match="data offsets"):
        decode_graph(encode_graph(small_graph(), blob))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_rejected_cleanly(data):
    with pytest.raises(GraphError):
        decode_graph(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_headers_are_rejected_cleanly(value):
    with pytest.raises(GraphError):
        decode_graph(envelope({"schema": SCHEMA, "graph": value}))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "args", "kwargs", "invoke", "line", "optional"]), json_values))
def test_random_nodes_are_rejected_or_valid(node):
    # Either the decoder accepts a node it can fully validate, or it says why: never another error.
    with contextlib.suppress(GraphError):
        decode_graph(envelope(header_with(nodes=[node])))


def test_graph_package_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import nnfabric.graph; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
