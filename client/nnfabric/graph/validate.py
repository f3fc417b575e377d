"""Checks that a decoded graph only uses registry ops, well-formed arguments and allowed sizes.

Usage::

    validate_graph(graph, Limits(max_nodes=1000), tensor_names={"t0"}, module_paths=paths)

Raises GraphError with a message that names the node, its op and, where known, the user's line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ir import DType, Graph, Node, Ref, SourceLine, TensorRef
from .leaves import iter_leaves
from .ops import DTYPES, OPS, TENSOR_ATTRIBUTES


class GraphError(ValueError):
    """A graph or envelope that must not be executed. `node` is the offending node's id, if any."""

    def __init__(self, message: str, node: int | None = None, trace: int | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.trace = trace  # which trace of a session, when the job is one
        self.line: SourceLine | None = None  # the user's line that recorded the node, when known


class LimitExceeded(GraphError):
    """The request is larger than a limit allows (bytes, nodes, invokes, traces): HTTP 413."""


@dataclass(frozen=True)
class Limits:
    """What one job may send. These defaults are the fabric's (the catalog's per-model limits and
    the gateway's settings start from them); `Limits.local()` is for a researcher's own machine."""

    max_nodes: int = 10_000
    max_depth: int = 32
    max_invokes: int = 256
    max_header_bytes: int = 8 << 20
    max_tensor_bytes: int = 64 << 20
    max_envelope_bytes: int = 96 << 20
    max_new_tokens: int = 256
    max_traces: int = 64  # traces in one session (patching every layer of a deep model is one)
    max_tensors: int = 4096  # tensors carried beside the graph
    # Parsing bounds: objects and lists in a JSON header (counted before it is parsed), and
    # characters in any one string (a prompt included: tokenizing is paid before the model runs).
    max_json_containers: int = 400_000
    max_string_chars: int = 262_144

    @classmethod
    def local(cls) -> Limits:
        """Your own machine: only the structural limits (nesting depth) still apply."""
        huge = 1 << 62
        return cls(max_nodes=huge, max_invokes=huge, max_header_bytes=huge, max_tensor_bytes=huge,
                   max_envelope_bytes=huge, max_new_tokens=huge, max_traces=huge, max_tensors=huge,
                   max_json_containers=huge, max_string_chars=huge)  # fmt: skip


def _where(node: Node) -> str:
    where = f"node {node.id} ({node.op})"
    if node.line is not None:
        where += f' at {node.line.file}:{node.line.line} "{node.line.code}"'
    return where


_PLAIN = frozenset({int, str, float, bool, type(None)})


def _check_value(value: Any, node: Node, tensor_names: set[str] | None) -> None:
    if type(value) in _PLAIN or (type(value) is list and all(type(v) in _PLAIN for v in value)):
        return  # literals, token ids: nothing to check
    for leaf in iter_leaves(value):
        if isinstance(leaf, Ref):
            if leaf.id >= node.id:
                raise GraphError(
                    f"{_where(node)} refers to node {leaf.id}, which is not earlier in the graph "
                    "(forward references and cycles are not allowed)",
                    node.id,
                )
        elif isinstance(leaf, TensorRef):
            if tensor_names is not None and leaf.name not in tensor_names:
                raise GraphError(f"{_where(node)} refers to tensor {leaf.name!r}, which is not in the blob", node.id)
        elif isinstance(leaf, DType) and leaf.name not in DTYPES:
            raise GraphError(f"{_where(node)} uses unknown dtype {leaf.name!r}", node.id)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_node(
    node: Node, graph: Graph, tensor_names: set[str] | None, module_paths: set[str] | frozenset[str] | None
) -> None:
    spec = OPS.get(node.op)
    if spec is None:
        raise GraphError(f"node {node.id}: unknown op {node.op!r}", node.id)
    if not spec.min_args <= len(node.args) <= spec.max_args:
        raise GraphError(
            f"{_where(node)} takes {spec.min_args}..{spec.max_args} arguments, got {len(node.args)}", node.id
        )
    if not 0 <= node.invoke < len(graph.invokes):
        raise GraphError(f"{_where(node)} belongs to invoke {node.invoke}, which does not exist", node.id)
    if spec.name_arg is not None:
        name = node.args[spec.name_arg]
        if not isinstance(name, str) or name not in spec.names:
            raise GraphError(f"{_where(node)}: {name!r} is not an allowed {node.op} name", node.id)
    if spec.module_event or node.op == "call_module":
        path = node.args[0]
        if not isinstance(path, str):
            raise GraphError(f"{_where(node)}: module path must be a string", node.id)
        if module_paths is not None and path not in module_paths:
            raise GraphError(f"{_where(node)}: the model has no module {path!r}", node.id)
    if node.op == "parameter":
        name = node.args[0]
        owner = name.rpartition(".")[0] if isinstance(name, str) else None
        if owner is None or not name.rpartition(".")[2].isidentifier():
            raise GraphError(f"{_where(node)}: a parameter is named by a string like 'lm_head.weight'", node.id)
        if module_paths is not None and owner not in module_paths:
            raise GraphError(f"{_where(node)}: the model has no module {owner!r}", node.id)
    if spec.module_event:
        step, call = node.args[1], node.args[2]
        if not (_is_int(step) and step >= 0 and _is_int(call) and call >= 0):
            raise GraphError(f"{_where(node)}: step and call index must be non-negative integers", node.id)
    if node.op == "getattr":
        name = node.args[1]
        if not isinstance(name, str) or name.startswith("_"):
            raise GraphError(f"{_where(node)}: attribute {name!r} may not be read", node.id)
        if not (name in TENSOR_ATTRIBUTES or name.isidentifier()):
            raise GraphError(f"{_where(node)}: attribute {name!r} may not be read", node.id)
    if node.op == "from_trace" and not (_is_int(node.args[0]) and _is_int(node.args[1])):
        raise GraphError(f"{_where(node)}: trace and node must be integers", node.id)
    if "out" in node.kwargs:
        # `out=` writes into a tensor the graph names: it could alias a value it may not write.
        raise GraphError(f"{_where(node)}: the out= argument is not allowed; use the returned value", node.id)
    if node.op in ("setitem", "set_grad", "grad", "append") and not isinstance(node.args[0], Ref):
        raise GraphError(f"{_where(node)}: its first argument must be a node reference", node.id)
    _check_value(node.args, node, tensor_names)
    _check_value(node.kwargs, node, tensor_names)


def validate_graph(
    graph: Graph,
    limits: Limits | None = None,
    *,
    tensor_names: set[str] | None = None,
    module_paths: set[str] | frozenset[str] | None = None,
) -> None:
    """Raise GraphError unless the graph is safe and well formed. `None` skips that check."""
    limits = limits or Limits()
    if len(graph.nodes) > limits.max_nodes:
        raise LimitExceeded(f"graph has {len(graph.nodes)} nodes, over the limit of {limits.max_nodes}")
    if len(graph.invokes) > limits.max_invokes:
        raise LimitExceeded(f"graph has {len(graph.invokes)} invokes, over the limit of {limits.max_invokes}")
    if not graph.invokes:
        raise GraphError("graph needs at least one invoke")
    for index, node in enumerate(graph.nodes):
        if node.id != index:
            raise GraphError(f"node at position {index} has id {node.id}")
        validate_node(node, graph, tensor_names, module_paths)
    for save in graph.saves:
        if not 0 <= save < len(graph.nodes):
            raise GraphError(f"saved node {save} does not exist")
    for index, inv in enumerate(graph.invokes):
        if inv.args is None and inv.kwargs:
            raise GraphError(f"invoke {index}: an invoke without inputs (the whole batch) takes no keyword inputs")
        dummy = Node("literal", [None], id=len(graph.nodes) + 1)
        for value in (inv.args or [], inv.kwargs):
            try:
                _check_value(value, dummy, tensor_names)
            except GraphError:
                raise GraphError(f"invoke {index}: inputs refer to a missing tensor or node") from None
    if graph.kind == "generate":
        n = graph.options.get("max_new_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limits.max_new_tokens:
            raise GraphError(f"max_new_tokens must be an integer in 1..{limits.max_new_tokens}, got {n!r}")
    forward = graph.options.get("forward", {})
    if not isinstance(forward, dict):
        raise GraphError("option 'forward' must map keyword names to values")
    for name, value in forward.items():
        if not name.isidentifier() or name.startswith("_") or len(name) > 64 or name in STRUCTURAL_KWARGS:
            raise GraphError(f"forward keyword {name[:64]!r} is not allowed (the fabric sets the model's inputs)")
        if not (value is None or isinstance(value, (bool, int, float, str, TensorRef))):
            raise GraphError(f"forward keyword {name!r} takes a bool, number, string, None or tensor")
    for key, value in graph.options.items():
        if key not in OPTIONS:
            raise GraphError(f"unknown option {key!r}; allowed: {sorted(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]) or (isinstance(value, bool) and OPTIONS[key] is not bool):
            raise GraphError(f"option {key!r} has the wrong type {type(value).__name__}")


def validate_session(
    graphs: list[Graph],
    limits: Limits | None = None,
    *,
    tensor_names: set[str] | None = None,
    module_paths: set[str] | frozenset[str] | None = None,
) -> None:
    """A job's traces (one, or a session's several): each valid, and values from earlier traces only."""
    limits = limits or Limits()
    if len(graphs) > limits.max_traces:
        raise LimitExceeded(f"a session holds at most {limits.max_traces} traces, this one has {len(graphs)}")
    if not graphs:
        raise GraphError("a job needs at least one trace")
    total = sum(len(g.nodes) for g in graphs)
    if total > limits.max_nodes:
        raise LimitExceeded(f"the session has {total} nodes, over the limit of {limits.max_nodes}")
    for index, graph in enumerate(graphs):
        try:
            validate_graph(graph, limits, tensor_names=tensor_names, module_paths=module_paths)
            for node in graph.nodes:
                if node.op != "from_trace":
                    continue
                trace, source = node.args
                if not 0 <= trace < index:
                    raise GraphError(f"{_where(node)} uses trace {trace}; only earlier traces can be used", node.id)
                if not 0 <= source < len(graphs[trace].nodes):
                    raise GraphError(
                        f"{_where(node)} uses node {source} of trace {trace}, which does not exist", node.id
                    )
        except GraphError as exc:
            if len(graphs) > 1 and exc.trace is None:
                exc = type(exc)(f"trace {index}: {exc}", exc.node, index)
            if exc.node is not None and 0 <= exc.node < len(graph.nodes):
                exc.line = graph.nodes[exc.node].line
            raise exc from None


# Forward keywords the fabric owns: what the batch is made of, and how outputs come back.
STRUCTURAL_KWARGS = frozenset({
    "input_ids", "attention_mask", "position_ids", "inputs_embeds", "past_key_values", "cache_position",
    "return_dict", "return_dict_in_generate", "generation_config", "streamer", "logits_processor",
    "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "num_beams", "num_return_sequences",
    "pad_token_id", "max_new_tokens", "max_length", "kwargs",
})  # fmt: skip

OPTIONS: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": (int, float),
    "top_k": int,
    "top_p": (int, float),
    "seed": int,
    "model": str,
    "forward": dict,  # keyword arguments for the model's forward / generate
    "scan": bool,  # shapes and dtypes only: the model runs on fake tensors (no data, no FLOPs)
    # Run alone, never merged with other jobs: bit-identical to a solo run of the same job and
    # reproducible whoever else is queued (on a GPU a kernel's sums depend on the batch).
    "exact": bool,
    # A generation sends each step's new tokens as `tokens` events on the job's stream while it
    # runs (best effort: the result holds them all; a job that runs alone sends none).
    "stream": bool,
}
