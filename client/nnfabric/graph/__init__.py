"""The intervention graph as data: IR, op registry, validation and wire codec. Imports no torch."""

from .codec import decode_graph, decode_result, encode_graph, encode_result, split_envelope
from .ir import RESULT_SCHEMA, SCHEMA, DType, Graph, Invoke, Node, Ref, SourceLine, TensorRef
from .validate import GraphError, Limits, validate_graph

__all__ = [
    "RESULT_SCHEMA",
    "SCHEMA",
    "DType",
    "Graph",
    "GraphError",
    "Invoke",
    "Limits",
    "Node",
    "Ref",
    "SourceLine",
    "TensorRef",
    "decode_graph",
    "decode_result",
    "encode_graph",
    "encode_result",
    "split_envelope",
    "validate_graph",
]
