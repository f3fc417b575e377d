"""`.source`: the operations inside a module's forward, each readable and writable like a module.

Usage::

    ops = operations(type(module).forward)      # (SourceOp("self_c_attn_0", 3, "..."), ...)
    with instrumented(module, on_call):         # on_call(name, fn, args, kwargs) -> result
        module(x)

A module's forward is Python source: every call in it (`self.c_attn(x)`, `torch.matmul(q, k)`,
`attention_interface(...)`) gets a stable, printable name (the callee's dotted name and its
index among calls of that name, in source order). Instrumenting recompiles the forward with each
call routed through a dispatcher that hands it to `on_call`; nothing else changes, so one
family-agnostic rewrite covers every model whose code is Python (no per-family tables). Only the
model's own code is ever rewritten: a request names an operation, it never brings code.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import linecache
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

from ..graph.tree import SourceOp

OnCall = Callable[[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

# Calls that read their caller's frame, or that only ask questions: never wrapped.
_UNWRAPPED = frozenset({"super", "locals", "globals", "vars", "isinstance", "hasattr", "len", "getattr", "type"})
_HOOK_ATTR = "_nnfabric_source_hook"


def _callee_name(func: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return "_".join(reversed(parts)) or "call"


def _wrappable(call: ast.Call) -> bool:
    return not (isinstance(call.func, ast.Name) and call.func.id in _UNWRAPPED)


class _Calls(ast.NodeVisitor):
    """The forward's own calls in source order (nested functions and lambdas run elsewhere)."""

    def __init__(self) -> None:
        self.found: list[ast.Call] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if self._depth == 0:
            self._depth += 1
            for statement in node.body:
                self.visit(statement)
            self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return None

    def visit_Raise(self, node: ast.Raise) -> None:
        return None  # building an exception to raise is not an operation worth naming

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        return None

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)  # arguments run before the call itself
        if _wrappable(node):
            self.found.append(node)


def _parsed(function: Callable[..., Any]) -> tuple[ast.FunctionDef, str, int] | None:
    """The forward's definition, its file, and the line it starts on; None when it has no source."""
    inner = inspect.unwrap(function)
    try:
        lines, start = inspect.getsourcelines(inner)
        filename = inspect.getsourcefile(inner) or "<unknown>"
    except (OSError, TypeError):
        return None
    try:
        module = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return None
    definition = module.body[0] if module.body else None
    if not isinstance(definition, ast.FunctionDef):
        return None
    ast.increment_lineno(module, start - 1)
    return definition, filename, start


def _named(calls: list[ast.Call]) -> list[tuple[str, ast.Call]]:
    seen: dict[str, int] = {}
    named = []
    for call in calls:
        base = _callee_name(call.func)
        index = seen.get(base, 0)
        seen[base] = index + 1
        named.append((f"{base}_{index}", call))
    return named


@functools.cache
def operations(function: Callable[..., Any]) -> tuple[SourceOp, ...]:
    """The named operations of a forward function (empty when it has no Python source)."""
    parsed = _parsed(function)
    if parsed is None:
        return ()
    definition, filename, _start = parsed
    calls = _Calls()
    calls.visit(definition)
    ops = []
    for name, call in _named(calls.found):
        text = linecache.getline(filename, call.lineno).strip()
        ops.append(SourceOp(name, call.lineno - definition.lineno + 1, text))
    return tuple(ops)


class _Rewrite(ast.NodeTransformer):
    def __init__(self, names: dict[int, str], owner: str) -> None:
        self.names = names
        self.owner = owner

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        name = self.names.get(id(node))
        if name is None:
            return node
        return ast.copy_location(
            ast.Call(
                func=ast.Name("__nnfabric_call__", ast.Load()),
                args=[ast.Name(self.owner, ast.Load()), ast.Constant(name), node.func, *node.args],
                keywords=node.keywords,
            ),
            node,
        )


def _dispatch(module: Any, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    hook: OnCall | None = module.__dict__.get(_HOOK_ATTR)
    if hook is None:
        return fn(*args, **kwargs)
    return hook(name, fn, args, kwargs)


@functools.cache
def _rewritten(function: Callable[..., Any], owner_class: type) -> Callable[..., Any] | None:
    """The forward recompiled with each named call routed through `_dispatch` (cached per function)."""
    parsed = _parsed(function)
    if parsed is None:
        return None
    definition, filename, _start = parsed
    calls = _Calls()
    calls.visit(definition)
    names = {id(call): name for name, call in _named(calls.found)}
    if not definition.args.args:
        return None
    owner = definition.args.args[0].arg
    definition = _Rewrite(names, owner).visit(definition)
    # A factory supplies the dispatcher and `__class__` (for zero-argument super()) as closures.
    factory = ast.FunctionDef(
        name="__nnfabric_factory__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg("__nnfabric_call__"), ast.arg("__class__")],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[definition, ast.Return(ast.Name(definition.name, ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    module = ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[]))
    # Only the model's own source (from inspect) is ever compiled here; a request names operations.
    code = compile(module, filename, "exec")
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    factory_function = types.FunctionType(factory_code, inspect.unwrap(function).__globals__)
    built: Callable[..., Any] = factory_function(_dispatch, owner_class)
    return built


def _forward_slot(module: Any) -> str:
    # accelerate's hooks keep the model's forward in `_old_forward` and wrap it in `forward`.
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def forward_of(module: Any) -> Callable[..., Any]:
    slot = _forward_slot(module)
    bound = getattr(module, slot)
    return getattr(bound, "__func__", bound)


def module_operations(module: Any) -> tuple[SourceOp, ...]:
    """The operations `.source` offers on `module` (its forward's named calls); none for
    containers without a forward of their own (ModuleList, ModuleDict)."""
    function = forward_of(module)
    if getattr(function, "__name__", "") == "_forward_unimplemented":
        return ()
    return operations(function)


@contextlib.contextmanager
def instrumented(module: Any, on_call: OnCall) -> Iterator[None]:
    """While open, every named call in `module`'s forward goes through `on_call`."""
    function = forward_of(module)
    owner = next((c for c in type(module).__mro__ if function.__name__ in c.__dict__), type(module))
    rewritten = _rewritten(function, owner)
    if rewritten is None:
        raise ValueError(f"{type(module).__name__}.forward has no Python source to instrument")
    slot = _forward_slot(module)
    had = slot in module.__dict__
    previous = module.__dict__.get(slot)
    module.__dict__[slot] = rewritten.__get__(module)
    module.__dict__[_HOOK_ATTR] = on_call
    try:
        yield
    finally:
        module.__dict__.pop(_HOOK_ATTR, None)
        if had:
            module.__dict__[slot] = previous
        else:
            module.__dict__.pop(slot, None)
