"""Proxy: a stand-in for a value the model will produce; every operation on it records a node.

Usage::

    with model.trace("Hello") as tracer:
        h = model.transformer.h[0].output[0]     # a Proxy
        top = (h * 2).softmax(-1).save()         # more Proxies, one node each
    top.value                                    # the real tensor, after the block
    top.shape                                    # forwarded to the value

Inside the block a proxy has no value; `bool()`, `len()` and iteration are refused with a
message saying why. After the block, a saved proxy behaves like its value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..graph.leaves import iter_leaves, map_leaves
from ..graph.ops import TENSOR_METHODS
from ..runtime.torch_ops import FUNCTION_NAMES

if TYPE_CHECKING:
    from .recording import Recording

_PENDING = object()


class Proxy:
    __slots__ = ("_id", "_recording", "_value")

    def __init__(self, recording: Recording, node_id: int) -> None:
        object.__setattr__(self, "_recording", recording)
        object.__setattr__(self, "_id", node_id)
        object.__setattr__(self, "_value", _PENDING)

    # -- results ---------------------------------------------------------------------------
    def save(self) -> Proxy:
        """Keep this value after the trace; read it with `.value`."""
        self._recording.save(self)
        return self

    @property
    def value(self) -> Any:
        if self._value is _PENDING:
            recording = self._recording
            if recording.active:
                raise ValueError("a proxy has no value inside the trace block; read .value after it")
            if not recording.is_saved(self._id):
                raise ValueError("this value was not saved: call .save() on it inside the trace")
            if recording.failure is not None:
                raise ValueError(f"this trace's job failed: {recording.failure}") from recording.failure
            if recording.job is not None:
                raise ValueError(f"job {recording.job.id} has not delivered yet: call tracer.job.wait() first")
            raise ValueError("this value was never computed (the trace did not run or failed)")
        return self._value

    def _resolved(self) -> bool:
        return self._value is not _PENDING

    def _record(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self._resolved():
            raise RuntimeError("the trace has ended; operate on .value instead")
        recording = self._recording
        current = recording.now_open()
        if not recording.active and current is not None and recording.session is not None:
            # A value of an earlier trace of the session, used in the one now open.
            return current.record(op, list(args), kwargs)
        return recording.record(op, list(args), kwargs)

    # -- recording ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._resolved():
            return getattr(self._value, name)
        if name in TENSOR_METHODS:
            return _Method(self, name)
        if name == "grad":
            return self._recording.record("grad", [self], {})
        if name.startswith("_"):
            raise AttributeError(f"private attribute {name!r} cannot be traced")
        return self._record("getattr", self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            self._record("set_grad", self, value)
            return
        raise AttributeError(f"cannot set attribute {name!r} on a traced value; only .grad can be set")

    def backward(self, gradient: Any = None) -> None:
        """Backpropagate from this value inside the trace; read `.grad` of activations."""
        args = [self] if gradient is None else [self, gradient]
        self._record("backward", *args)

    def append(self, item: Any) -> None:
        """Append to a list made with `tracer.list()`, e.g. one value per generation step."""
        if self._resolved():
            self._value.append(item)
            return
        self._record("append", self, item)

    def __getitem__(self, key: Any) -> Any:
        if self._resolved():
            return self._value[key]
        return self._record("getitem", self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._resolved():
            self._value[key] = value
            return
        self._record("setitem", self, key, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a traced value is not callable")

    def __bool__(self) -> bool:
        if self._resolved():
            return bool(self._value)
        raise TypeError(
            "a traced value has no truth value inside the trace: Python `if`/`while` run while the "
            "graph is built, before the model runs. Use torch.where(...) instead"
        )

    def __len__(self) -> int:
        if self._resolved():
            return len(self._value)
        raise TypeError("len() of a traced value is unknown inside the trace; use .shape[0] or .size(0)")

    def __iter__(self) -> Any:
        if self._resolved():
            return iter(self._value)
        raise TypeError("a traced value cannot be iterated inside the trace; index it instead")

    def __repr__(self) -> str:
        if self._resolved():
            return repr(self._value)
        node = self._recording.graph.nodes[self._id]
        return f"<nnfabric.Proxy node {self._id}: {node.op}>"

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if self._resolved() else repr(self)

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return int(self.value)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return record_torch_function(func, args, kwargs or {})

    # Proxies are graph handles, so identity hashing keeps them usable as dict keys.
    __hash__ = object.__hash__


class _Method:
    """A bound tensor method awaiting its call: `h.softmax` then `(-1)`."""

    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy._record("call_method", self._name, self._proxy, *args, **kwargs)


def _binary(name: str, reflected: bool = False) -> Any:
    import operator

    op = getattr(operator, name)

    def method(self: Proxy, other: Any) -> Any:
        if self._resolved():
            return op(other, self._value) if reflected else op(self._value, other)
        if reflected:
            return self._record("binary", name, other, self)
        return self._record("binary", name, self, other)

    return method


def _unary(name: str) -> Any:
    import operator

    op = getattr(operator, name)

    def method(self: Proxy) -> Any:
        if self._resolved():
            return op(self._value)
        return self._record("unary", name, self)

    return method


for _name, _dunder in [
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "truediv"),
    ("floordiv", "floordiv"), ("mod", "mod"), ("pow", "pow"), ("matmul", "matmul"),
    ("and_", "and"), ("or_", "or"), ("xor", "xor"),
]:  # fmt: skip
    setattr(Proxy, f"__{_dunder}__", _binary(_name))
    setattr(Proxy, f"__r{_dunder}__", _binary(_name, reflected=True))
    # In-place operators record a new value; `a[k] += v` then becomes a setitem of it.
    setattr(Proxy, f"__i{_dunder}__", _binary(_name))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Proxy, f"__{_name}__", _binary(_name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(_name))


# Tensor dunders reached through __torch_function__ when a real tensor meets a proxy.
_DUNDER_BINARY = {
    "add": "add", "sub": "sub", "mul": "mul", "truediv": "truediv", "div": "truediv",
    "floordiv": "floordiv", "mod": "mod", "pow": "pow", "matmul": "matmul", "and": "and_",
    "or": "or_", "xor": "xor", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
}  # fmt: skip


def record_torch_function(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Turn a torch call that met a Proxy into a graph node, or say why it cannot be."""
    leaves = [leaf for leaf in iter_leaves((args, kwargs)) if isinstance(leaf, Proxy)]
    if leaves and all(leaf._resolved() for leaf in leaves):
        # Saved values after their trace: the call runs on the values, as on plain tensors.
        def unwrap(leaf: Any) -> Any:
            return leaf._value if isinstance(leaf, Proxy) else leaf

        return func(*map_leaves(args, unwrap), **map_leaves(kwargs, unwrap))
    recording = _find_recording(args, kwargs)
    if recording is None:
        raise TypeError(f"{getattr(func, '__name__', func)} got a proxy from an ended trace")
    name = FUNCTION_NAMES.get(func)
    if name is not None:
        return recording.record("call_function", [name, *args], kwargs)
    fname = getattr(func, "__name__", "")
    if fname.startswith("__") and fname.endswith("__"):
        core = fname[2:-2]
        reflected = core.startswith("r") and core[1:] in _DUNDER_BINARY
        key = core[1:] if reflected else core
        if key in _DUNDER_BINARY and len(args) == 2:
            left, right = (args[1], args[0]) if reflected else args
            return recording.record("binary", [_DUNDER_BINARY[key], left, right], {})
        if core == "getitem":
            return recording.record("getitem", list(args), {})
    if fname in TENSOR_METHODS and args and not isinstance(args[0], Proxy):
        return recording.record("call_method", [fname, *args], kwargs)
    raise TypeError(
        f"{getattr(func, '__qualname__', func)} is not an allowed operation inside a trace; "
        "see nnfabric.graph.ops for the allowed functions and methods"
    )


def _find_recording(args: Any, kwargs: Any) -> Any:
    for leaf in iter_leaves((args, kwargs)):
        if isinstance(leaf, Proxy):
            return leaf._recording
    return None


# -- what a recording reads and sets on its proxies (a proxy's own namespace is the user's) --------
def node_of(proxy: Proxy) -> int:
    """The node whose value the proxy stands for."""
    return int(proxy._id)


def recording_of(proxy: Proxy) -> Recording:
    return proxy._recording


def is_resolved(proxy: Proxy) -> bool:
    return proxy._resolved()


def value_of(proxy: Proxy) -> Any:
    return proxy._value


def deliver(proxy: Proxy, value: Any) -> None:
    """Give the proxy its value (after the run)."""
    object.__setattr__(proxy, "_value", value)


def retarget(proxy: Proxy, node: int) -> None:
    """Point the proxy at another node (a block's value at its last generation step)."""
    object.__setattr__(proxy, "_id", node)
