"""A connection to an nnfabric deployment, and the hosted models it serves.

Usage::

    fabric = nnfabric.connect("http://127.0.0.1:8000", api_key="nnf_...")   # or NNFABRIC_URL/_API_KEY
    model = fabric.model("gpt2")            # module tree + tokenizer from the API; no weights
    with model.trace("The Eiffel Tower is in", remote=True):
        hidden = model.transformer.h[5].output.save()
    nnfabric.job(job_id).result()           # reattach to a job from any process

A local `LanguageModel(..., remote_name="gpt2")` runs the same block remotely too.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

from .graph.tree import ModuleTree
from .models import LanguageModel
from .protocol import ModelInfo
from .remote.config import connection_settings, default_fabric, set_default
from .remote.display import html_table
from .remote.http import FabricClient
from .remote.job import Job


class Fabric(FabricClient):
    """A connection to one fabric with one API key (`nnfabric.connect()` makes one). Shown in a
    notebook (or IPython), it lists the models it serves with their state and queue."""

    def _catalog(self) -> tuple[list[ModelInfo], str | None]:
        """The served models for a display, or the reason they could not be read (a display never raises)."""
        try:
            return self.models(), None
        except Exception as exc:
            return [], f"{type(exc).__name__}: {exc}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        models, problem = self._catalog()
        lines = [repr(self)]
        lines += [f"  {m['name']}: {m['state']}, {m['replicas']} replica(s), {m['queue_depth']} queued" for m in models]
        if problem:
            lines.append(f"  models unknown: {problem}")
        printer.text("\n".join(lines))

    def _repr_html_(self) -> str:
        models, problem = self._catalog()
        head = "<tr><th>model</th><th>state</th><th>replicas</th><th>queued</th><th>dtype</th></tr>"
        rows = "".join(
            f"<tr><td><code>{html.escape(m['name'])}</code></td><td>{html.escape(m['state'])}</td>"
            f"<td>{m['replicas']}</td><td>{m['queue_depth']}</td><td>{html.escape(m['dtype'])}</td></tr>"
            for m in models
        )
        table = f"<table>{head}{rows}</table>" if models else f"<p>models unknown: {html.escape(problem or 'none')}</p>"
        return html_table("nnfabric fabric", [("url", self.url)], table)

    def model(self, name: str) -> LanguageModel:
        """A thin LanguageModel for a hosted model: its module tree and tokenizer, no weights."""
        tree = ModuleTree.from_json(dict(self.structure(name)["tree"]))
        tokenizer = _tokenizer_from_files(self.tokenizer_files(name))
        return LanguageModel(tree=tree, tokenizer=tokenizer, remote_name=name, fabric=self)


def connect(url: str | None = None, api_key: str | None = None, progress: bool | None = None) -> Fabric:
    """Connect to a fabric and make it the default. Each of url and api_key comes from the
    argument, else NNFABRIC_URL / NNFABRIC_API_KEY, else ~/.config/nnfabric/config.toml."""
    fabric = Fabric(*connection_settings(url, api_key), progress=progress)
    set_default(fabric)
    return fabric


def job(job_id: str, fabric: FabricClient | None = None) -> Job:
    """Reattach to a job by id (from any process), with the default connection."""
    return Job(fabric or default_fabric(), job_id)


def _tokenizer_from_files(files: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            Path(tmp, Path(name).name).write_text(text)
        return AutoTokenizer.from_pretrained(tmp)
