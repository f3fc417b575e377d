"""The fixed registry of operations an intervention graph may contain.

Usage::

    spec = OPS["call_method"]          # arity and how its first argument is checked
    assert "softmax" in TENSOR_METHODS

This module is plain data: the gateway validates graphs with it without importing torch,
and the runtime's implementation table is checked against it by a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpSpec:
    """How many positional arguments an op takes and which of them must be a literal name."""

    min_args: int
    max_args: int
    # Index of an argument that must be a string from `names` (the method, function, operator).
    name_arg: int | None = None
    names: frozenset[str] = frozenset()
    # Ops that read or write a module's value: args[0] is a module path, args[1] the step,
    # args[2] the call index within that step.
    module_event: bool = False


BINARY_OPERATORS = frozenset(
    {
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor",
    }
)  # fmt: skip
UNARY_OPERATORS = frozenset({"neg", "pos", "abs", "invert"})

TENSOR_METHODS = frozenset(
    {
        "abs", "add", "all", "any", "argmax", "argmin", "argsort", "bfloat16", "chunk",
        "clamp", "clone", "contiguous", "cos", "cpu", "cumsum", "detach", "diff", "dim",
        "div", "double", "eq", "exp", "expand", "expand_as", "flatten", "flip", "float",
        "gather", "ge", "gt", "half", "index_select", "int", "isnan", "item", "le", "log",
        "log_softmax", "logsumexp", "long", "lt", "masked_fill", "matmul", "max", "mean",
        "min", "mul", "ne", "neg", "norm", "numel", "permute", "pow", "prod", "relu",
        "repeat", "reshape", "roll", "round", "sigmoid", "sign", "sin", "size", "softmax",
        "sort", "split", "sqrt", "square", "squeeze", "std", "sub", "sum", "t", "tanh",
        "to", "tolist", "topk", "transpose", "type_as", "unbind", "unsqueeze", "var",
        "view", "view_as", "where", "zero_",
    }
)  # fmt: skip

TORCH_FUNCTIONS = frozenset(
    {
        "torch.abs", "torch.allclose", "torch.arange", "torch.argmax", "torch.cat",
        "torch.clamp", "torch.cosine_similarity", "torch.cumsum", "torch.einsum",
        "torch.exp", "torch.eye", "torch.full", "torch.full_like", "torch.gather",
        "torch.linspace", "torch.log", "torch.log_softmax", "torch.matmul", "torch.max",
        "torch.mean", "torch.min", "torch.norm", "torch.ones", "torch.ones_like",
        "torch.outer", "torch.rand_like", "torch.randn_like", "torch.softmax",
        "torch.sort", "torch.stack", "torch.sum", "torch.tensor", "torch.topk",
        "torch.where", "torch.zeros", "torch.zeros_like",
        "torch.nn.functional.cosine_similarity", "torch.nn.functional.cross_entropy",
        "torch.nn.functional.gelu", "torch.nn.functional.kl_div",
        "torch.nn.functional.layer_norm", "torch.nn.functional.log_softmax",
        "torch.nn.functional.mse_loss", "torch.nn.functional.normalize",
        "torch.nn.functional.one_hot", "torch.nn.functional.relu",
        "torch.nn.functional.softmax",
    }
)  # fmt: skip

# Attributes a graph may read from a tensor. Mapping-like values (model outputs) are read by
# key instead, so no attribute of an arbitrary server object is ever reachable.
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "T", "mT", "real", "imag"})

DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "bool"}
)  # fmt: skip

OPS: dict[str, OpSpec] = {
    # Module events. args: path, step, call[, value]
    "output": OpSpec(3, 3, module_event=True),
    "input": OpSpec(3, 3, module_event=True),
    "inputs": OpSpec(3, 3, module_event=True),
    "set_output": OpSpec(4, 4, module_event=True),
    "set_input": OpSpec(4, 4, module_event=True),
    "set_inputs": OpSpec(4, 4, module_event=True),
    # A parameter of the model, read-only: args: its dotted name (e.g. "lm_head.weight").
    "parameter": OpSpec(1, 1),
    # Calls a module of the model on graph values (logit lens), bypassing interventions.
    # args: path, *call args
    "call_module": OpSpec(1, 16),
    # Values
    "literal": OpSpec(1, 1),
    "getitem": OpSpec(2, 2),
    "setitem": OpSpec(3, 3),
    "getattr": OpSpec(2, 2),
    "binary": OpSpec(3, 3, name_arg=0, names=BINARY_OPERATORS),
    "unary": OpSpec(2, 2, name_arg=0, names=UNARY_OPERATORS),
    "call_method": OpSpec(2, 16, name_arg=0, names=TENSOR_METHODS),
    "call_function": OpSpec(1, 16, name_arg=0, names=TORCH_FUNCTIONS),
    "list": OpSpec(0, 0),
    "append": OpSpec(2, 2),
    # Gradients
    "grad": OpSpec(1, 1),
    "set_grad": OpSpec(2, 2),
    "backward": OpSpec(1, 2),
    # Sessions: the value of node args[1] of an earlier trace args[0] of the same job.
    "from_trace": OpSpec(2, 2),
    # Control
    "stop": OpSpec(0, 0),
    "model_output": OpSpec(0, 0),
}
