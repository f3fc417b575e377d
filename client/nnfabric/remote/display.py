"""What a remote job shows while it runs: one updating line in a Jupyter notebook, a rich
progress line on a terminal, nothing elsewhere (a log file, a pipe, a test).

Usage::

    with JobProgress(progress_mode(setting), job_id, "gpt2") as line:   # one job's state
        line.show({"type": "queued", "position": 2})
    with SweepProgress(progress_mode(setting), total=64) as bar:        # a sweep: one bar
        bar.advance(failed=False)

`setting` is what the user passed (`nnfabric.connect(progress=...)`, `model.sweep(progress=...)`):
None (the default) shows where someone watches, False never, True always; NNFABRIC_PROGRESS=0 turns
the default off. IPython is imported only inside a running kernel: the client never needs it.
"""

from __future__ import annotations

import html
import os
import sys
import time
from typing import Any, Literal

Mode = Literal["notebook", "terminal"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell with a kernel), not in a terminal IPython."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has imported it already
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_mode(setting: bool | None) -> Mode | None:
    """Where progress goes for this setting: the notebook, the terminal (stderr), or nowhere."""
    if setting is False:
        return None
    if setting is None and os.environ.get("NNFABRIC_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return None
    if in_notebook():
        return "notebook"
    if setting or sys.stderr.isatty():
        return "terminal"
    return None


def notebook_display(text: str, markup: str) -> Any:
    """Show a line in the notebook; returns a handle whose `update(bundle, raw=True)` replaces it."""
    from IPython.display import display

    return display({"text/plain": text, "text/html": markup}, raw=True, display_id=True)


def elapsed(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def describe_event(event: dict[str, Any]) -> str:
    """A job event as the words of a progress line."""
    kind = event.get("type")
    if kind == "queued":
        position = event.get("position")
        return "queued" if position is None else f"queued, position {position}"
    if kind == "log":
        return str(event.get("message"))
    if kind == "completed":
        return "done"
    if kind == "failed":
        return f"failed: {event.get('message') or event.get('error') or 'no reason given'}"
    return str(kind)


class JobProgress:
    """One job's state as one line: queued with its position, running, done."""

    def __init__(self, mode: Mode | None, job_id: str, model: str | None = None) -> None:
        self.mode = mode
        self.label = f"job {job_id[:8]}" + (f" on {model}" if model else "")
        self.started = time.monotonic()
        self.state = "submitted"
        self._handle: Any = None
        self._live: Any = None

    def __enter__(self) -> JobProgress:
        if self.mode == "notebook":
            self._handle = notebook_display(*self._render())
        elif self.mode == "terminal":
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            # transient: a script's own output stays as it would be without nnfabric
            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  transient=True, console=_stderr_console())  # fmt: skip
            self._task = self._live.add_task(self._line(), total=None)
            self._live.start()
        return self

    def show(self, event: dict[str, Any]) -> None:
        self.state = describe_event(event)
        self._refresh()

    def _line(self) -> str:
        return f"{self.label}: {self.state}"

    def _render(self) -> tuple[str, str]:
        text = f"{self._line()} ({elapsed(time.monotonic() - self.started)})"
        markup = (
            f"<code>{html.escape(self.label)}</code>: <b>{html.escape(self.state)}</b> "
            f"<span style='opacity:0.6'>({elapsed(time.monotonic() - self.started)})</span>"
        )
        return text, markup

    def _refresh(self) -> None:
        if self._handle is not None:
            text, markup = self._render()
            self._handle.update({"text/plain": text, "text/html": markup}, raw=True)
        if self._live is not None:
            self._live.update(self._task, description=self._line())

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is KeyboardInterrupt:
            self.state = "interrupted"
            self._refresh()
        if self._live is not None:
            self._live.stop()


class SweepProgress:
    """One bar for all of a sweep's jobs: done of total, and how many failed."""

    def __init__(self, mode: Mode | None, total: int) -> None:
        self.mode, self.total = mode, total
        self.done = self.failed = 0
        self.started = time.monotonic()
        self._handle: Any = None
        self._live: Any = None

    def __enter__(self) -> SweepProgress:
        if self.mode == "notebook":
            self._handle = notebook_display(*self._render())
        elif self.mode == "terminal":
            from rich.progress import Progress

            self._live = Progress(*Progress.get_default_columns(), transient=False, console=_stderr_console())
            self._task = self._live.add_task(self.text(), total=self.total)
            self._live.start()
        return self

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self._handle is not None:
            text, markup = self._render()
            self._handle.update({"text/plain": text, "text/html": markup}, raw=True)
        if self._live is not None:
            self._live.update(self._task, advance=1, description=self.text())

    def text(self) -> str:
        return f"sweep: {self.done}/{self.total} jobs" + (f", {self.failed} failed" if self.failed else "")

    def _render(self) -> tuple[str, str]:
        took = elapsed(time.monotonic() - self.started)
        markup = (
            f"<progress value='{self.done}' max='{self.total}' style='width:16em;vertical-align:middle'>"
            f"</progress> {html.escape(self.text())} <span style='opacity:0.6'>({took})</span>"
        )
        return f"{self.text()} ({took})", markup

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.stop()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def html_table(title: str, rows: list[tuple[str, str]], extra: str = "") -> str:
    """A small two-column table (field, value) for `_repr_html_`; values are escaped here."""
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f"<div><b>{html.escape(title)}</b><table>{cells}</table>{extra}</div>"
