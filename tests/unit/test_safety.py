"""Nothing in the codebase unpickles, evals, execs or torch.loads."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(
    r"^\s*(import (pickle|cloudpickle|dill)|from (pickle|cloudpickle|dill) )|torch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|pickle\.loads?\("
)


def test_no_pickle_eval_exec_or_torch_load():
    hits = []
    for folder in ("client", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []


def test_only_the_source_rewrite_compiles_code_and_only_the_models_own():
    """`.source` recompiles a module's forward from `inspect` (trusted model code); nothing else
    compiles, and what it compiles never comes from a request."""
    compiling = re.compile(r"(?<![.\w])compile\(")
    users = sorted(
        str(path.relative_to(ROOT))
        for folder in ("client", "services")
        for path in (ROOT / folder).rglob("*.py")
        if compiling.search(path.read_text())
    )
    assert users == ["client/nnfabric/runtime/source.py"]
    text = (ROOT / "client/nnfabric/runtime/source.py").read_text()
    assert "inspect.getsourcelines(inner)" in text and "exec(" not in text


def test_the_scan_would_catch_them():
    assert not FORBIDDEN.search("model.eval()")
    for bad in ["import pickle", "x = eval(s)", "exec(code)", "torch.load(f)", "pickle.loads(b)"]:
        assert FORBIDDEN.search(bad), bad
