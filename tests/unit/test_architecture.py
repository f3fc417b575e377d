"""The architecture's rules, checked on the source: who may import whom, where Redis keys live,
what the client distribution ships, and that versions and limits have one source."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"nnfabric": ROOT / "client" / "nnfabric", "services": ROOT / "services"}


def _modules() -> dict[str, Path]:
    found = {}
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that `name` imports at run time, including imports inside functions
    (but not those under `if TYPE_CHECKING:`), with the packages each import also runs."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    ours: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too ...
            prefix = ".".join(parts[:i])
            # ... unless the importer is inside them: its own packages are already initializing.
            if prefix in MODULES and prefix != name and not name.startswith(prefix + "."):
                ours.add(prefix)
    return ours


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    assert _cycles(GRAPH) == []


def test_the_import_scan_sees_function_level_imports():
    # nnfabric.models imports the remote configuration only inside a method.
    assert "nnfabric.remote.config" in GRAPH["nnfabric.models"]
    assert "nnfabric.tracing.tracer" in GRAPH["nnfabric.models"]


def _reaches(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_layers():
    client = {m for m in MODULES if m.startswith("nnfabric")}
    assert not any(dep.startswith("services") for m in client for dep in GRAPH[m]), "the client imports services"
    for module in [m for m in client if m.startswith("nnfabric.runtime")]:
        assert not {d for d in GRAPH[module] if d.startswith("nnfabric.tracing")}, f"{module} imports tracing"
    for module in [m for m in client if m.startswith("nnfabric.remote")]:
        reached = _reaches(module)
        assert "nnfabric.models" not in reached and not any(r.startswith("nnfabric.tracing") for r in reached), module
    for module in [m for m in client if m.startswith("nnfabric.graph")] + ["nnfabric.protocol"]:
        reached = _reaches(module)
        outside = {r for r in reached if not r.startswith("nnfabric.graph") and r != "nnfabric"}
        assert not outside, f"{module} reaches {outside}"


def test_gateway_and_scheduler_stay_light():
    for top in ("services.api", "services.scheduler", "services.common"):
        for module in [m for m in MODULES if m.startswith(top)]:
            reached = _reaches(module)
            heavy = {r for r in reached if r.startswith(("nnfabric.runtime", "nnfabric.tracing", "services.worker"))}
            assert not heavy, f"{module} reaches {heavy}"


def test_graph_imports_without_httpx_or_torch():
    code = (
        "import sys; sys.modules['httpx'] = None; sys.modules['torch'] = None; import nnfabric.graph, nnfabric.protocol; "
        "loaded = [m for m in sys.modules if m.startswith(('nnfabric.tracing', 'nnfabric.remote', 'nnfabric.runtime'))]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_redis_keys_are_named_only_in_the_store():
    key = re.compile(r"""["']nnf:""")
    hits = []
    for name, path in MODULES.items():
        if name == "services.common.store":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if key.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []
    # Nor does anything but the store hold a Redis client of its own.
    for name, path in MODULES.items():
        if name != "services.common.store":
            assert "Redis.from_url" not in path.read_text() and "import redis\n" not in path.read_text(), name


def test_the_client_distribution_ships_no_server(tmp_path):
    import shutil

    source = tmp_path / "client"  # setuptools writes build/ beside the sources: build a copy
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("nnfabric-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert any(n.startswith("nnfabric/graph/") for n in names)
    assert not any(n.startswith("services/") for n in names)
    # Nor the pipeline stages, which only a worker runs (services/worker/pipeline).
    code = "".join(archive.read(n).decode() for n in names if n.endswith(".py"))
    assert "StagedInterleaver" not in code and "load_stage" not in code
    import nnfabric

    assert f"nnfabric-{nnfabric.__version__}-" in wheel.name


def test_one_version_and_the_client_dependencies_in_the_server_distribution():
    import nnfabric

    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert "version" not in root and "version" not in client  # both read nnfabric.__version__
    assert set(client["dependencies"]) <= set(root["dependencies"]) | set(root["optional-dependencies"]["worker"])
    assert not {"torch", "transformers"} & set(root["dependencies"])  # the control image carries no torch
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "nnfabric" / "Chart.yaml").read_text())
    assert chart["appVersion"] == nnfabric.__version__
    from services.api.app import create_app

    assert create_app.__code__.co_names.count("__version__") == 1  # the api reports nnfabric.__version__


def test_limit_defaults_have_one_source():
    from nnfabric.graph import Limits

    from services.common.catalog import ModelLimits
    from services.common.settings import Settings

    defaults, model = Limits(), ModelLimits()  # type: ignore[call-arg]
    assert (model.max_nodes, model.max_tensor_bytes, model.max_new_tokens, model.max_traces) == (
        defaults.max_nodes, defaults.max_tensor_bytes, defaults.max_new_tokens, defaults.max_traces
    )  # fmt: skip
    assert Settings().max_envelope_bytes == defaults.max_envelope_bytes


# -- seams ------------------------------------------------------------------------------------------
# Private attributes of other libraries we read, and why.
LIBRARY_PRIVATES = {
    "_getframe": "sys._getframe: the user's frame, so errors point at their own line",
    "_cdata": "torch's storage handle: which values share memory with the model's weights",
    "_actor_id": "Ray's actor id, to name the pipeline stage that died",
}


def _defined(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            names.update(e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant))
        elif isinstance(node, ast.Call) and _sets_attribute(node.func):
            names.update(a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def _sets_attribute(func: ast.expr) -> bool:
    """`setattr(obj, "_name", v)` or `object.__setattr__(obj, "_name", v)`."""
    return (isinstance(func, ast.Name) and func.id == "setattr") or (
        isinstance(func, ast.Attribute) and func.attr == "__setattr__"
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_access_across_modules():
    """A module reads `obj._name` only where it defines `_name` itself (its own classes' state),
    and imports no `_name` of another of our modules; a library's private needs a reason above."""
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    ours = set().union(*(_defined(tree) for tree in trees.values()))
    found = []
    for name, tree in trees.items():
        here = _defined(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in here:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                    continue
                if node.attr in ours or node.attr not in LIBRARY_PRIVATES:
                    found.append(f"{name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                found += [f"{name}:{node.lineno} import {a.name}" for a in node.names if _private(a.name)]
    assert found == []


# Functions that are declarative tables, not logic.
LONG_TABLES = {"nnfabric.graph.schema.schema_defs"}


def test_no_function_over_60_lines():
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{name}.{node.name}" not in LONG_TABLES:
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    found.append(f"{name}.{node.name}: {length} lines")
    assert found == []


def test_the_interleaver_runs_every_op_of_the_registry_through_its_tables():
    from nnfabric.graph.ops import OPS
    from nnfabric.runtime.interleaver import STATEFUL_OPS
    from nnfabric.runtime.torch_ops import SIMPLE

    assert set(OPS) == set(SIMPLE) | STATEFUL_OPS
    tree = ast.parse((ROOT / "client" / "nnfabric" / "runtime" / "interleaver.py").read_text())
    (dispatch,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_dispatch"]
    compared = [c.value for n in ast.walk(dispatch) if isinstance(n, ast.Compare)
                for c in [n.left, *n.comparators] if isinstance(c, ast.Constant) and isinstance(c.value, str)]  # fmt: skip
    assert not compared  # a table lookup, not an if-chain over op names


def test_tests_need_no_path_tricks_and_unit_tests_no_servers():
    tests = ROOT / "tests"
    for path in tests.rglob("*.py"):
        tree = ast.parse(path.read_text())
        attributes = {(n.value.id, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name)}  # fmt: skip
        assert ("sys", "path") not in attributes, path
    fixtures = {"fabric", "alice", "redis_url", "gateway", "live_api"}  # each starts Redis, Ray or a server
    servers = {"RedisServer", "EmbeddedFabric", "start_fabric", "start_gateway"}  # what starts one
    packages = {"ray", "uvicorn", "redis", "redis.asyncio"}  # (ray.serve.schema is Serve's config models: no Ray)
    for path in (tests / "unit").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests_ = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        asked = {a.arg for n in tests_ for a in n.args.args}
        named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        found = (asked & fixtures) | (named & servers) | (imported & packages)
        assert not found, f"{path.name} uses {found}: it belongs in tests/integration"
