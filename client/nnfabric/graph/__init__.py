"""The intervention graph as data: IR, op registry, validation, wire codec and the module tree
a model publishes. Imports no torch, no HTTP client, nothing of tracing or the runtime: this is
the contract the gateway validates against."""

from .codec import (
    decode_graph,
    decode_request,
    decode_result,
    encode_graph,
    encode_result,
    split_envelope,
    validate_request,
)
from .ir import RESULT_SCHEMA, SCHEMA, DType, Graph, Invoke, Node, Ref, SourceLine, TensorRef
from .leaves import iter_leaves, map_leaves
from .tree import ModuleTree
from .validate import GraphError, LimitExceeded, Limits, validate_graph

__all__ = [
    "RESULT_SCHEMA",
    "SCHEMA",
    "DType",
    "Graph",
    "GraphError",
    "Invoke",
    "LimitExceeded",
    "Limits",
    "ModuleTree",
    "Node",
    "Ref",
    "SourceLine",
    "TensorRef",
    "decode_graph",
    "decode_request",
    "decode_result",
    "encode_graph",
    "encode_result",
    "iter_leaves",
    "map_leaves",
    "split_envelope",
    "validate_graph",
    "validate_request",
]
