"""What the client shows: a job's progress line (notebook, terminal, nowhere), a sweep's bar, the
rich displays of a job, a fabric and a model, and an interrupt that cancels remote jobs. A fake
kernel stands in for Jupyter here; tests/integration/test_notebooks.py runs a real one."""

from __future__ import annotations

import sys
import types
from typing import Any

import nnfabric
import pytest
from nnfabric.graph.tree import ModuleTree
from nnfabric.remote import display
from nnfabric.remote.display import JobProgress, SweepProgress, progress_mode
from nnfabric.remote.job import Job
from nnfabric.remote.sweep import SocketSender, _Run


class Handle:
    """A notebook display (IPython's DisplayHandle): what the line reads now."""

    def __init__(self, text: str, markup: str) -> None:
        self.shown = [(text, markup)]

    def update(self, bundle: dict[str, str], raw: bool) -> None:
        assert raw
        self.shown.append((bundle["text/plain"], bundle["text/html"]))


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch) -> list[Handle]:
    """A fake kernel: every line displayed is kept."""
    handles: list[Handle] = []

    def show(text: str, markup: str) -> Handle:
        handles.append(Handle(text, markup))
        return handles[-1]

    monkeypatch.setattr(display, "in_notebook", lambda: True)
    monkeypatch.setattr(display, "notebook_display", show)
    return handles


def fake_ipython(monkeypatch: pytest.MonkeyPatch, shell: Any) -> None:
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_a_kernel_is_told_from_a_terminal_ipython_and_from_plain_python(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not display.in_notebook()
    fake_ipython(monkeypatch, None)
    assert not display.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace())  # IPython in a terminal: no kernel
    assert not display.in_notebook()
    fake_ipython(monkeypatch, types.SimpleNamespace(kernel=object()))
    assert display.in_notebook()


def test_progress_goes_where_someone_watches_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(display, "in_notebook", lambda: False)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    assert progress_mode(None) is None  # a pipe, a log file, a test
    assert progress_mode(True) == "terminal"
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert progress_mode(None) == "terminal"
    assert progress_mode(False) is None
    monkeypatch.setenv("NNFABRIC_PROGRESS", "0")
    assert progress_mode(None) is None and progress_mode(True) == "terminal"  # an argument wins
    monkeypatch.delenv("NNFABRIC_PROGRESS")
    monkeypatch.setattr(display, "in_notebook", lambda: True)
    assert progress_mode(None) == "notebook" and progress_mode(True) == "notebook" and progress_mode(False) is None


def test_a_jobs_state_is_one_line_updated_in_place(notebook):
    with JobProgress("notebook", "0123456789abcdef", "gpt2") as line:
        line.show({"type": "queued", "position": 3})
        line.show({"type": "queued", "position": 1})
        line.show({"type": "running"})
        line.show({"type": "completed"})
    (handle,) = notebook  # one line, not one per event
    texts = [text.split(" (")[0] for text, _ in handle.shown]
    assert texts == [
        "job 01234567 on gpt2: submitted",
        "job 01234567 on gpt2: queued, position 3",
        "job 01234567 on gpt2: queued, position 1",
        "job 01234567 on gpt2: running",
        "job 01234567 on gpt2: done",
    ]
    assert "<b>done</b>" in handle.shown[-1][1]


def test_a_failure_and_an_interrupt_show_on_the_line(notebook):
    with JobProgress("notebook", "abc", None) as line:
        line.show({"type": "failed", "message": "shape <mismatch>"})
    assert notebook[0].shown[-1][0].startswith("job abc: failed: shape <mismatch>")
    assert "shape &lt;mismatch&gt;" in notebook[0].shown[-1][1]  # escaped in the HTML
    with pytest.raises(KeyboardInterrupt), JobProgress("notebook", "def", None):
        raise KeyboardInterrupt
    assert notebook[1].shown[-1][0].startswith("job def: interrupted")


def test_nothing_is_shown_without_a_mode(notebook):
    with JobProgress(None, "abc") as line:
        line.show({"type": "running"})
    with SweepProgress(None, 3) as bar:
        bar.advance(False)
    assert notebook == []


def test_a_terminal_gets_a_rich_progress_line():
    with JobProgress("terminal", "0123456789", "gpt2") as line:
        line.show({"type": "queued", "position": 2})
        assert line._live.tasks[0].description == "job 01234567 on gpt2: queued, position 2"
    assert not line._live.live.is_started
    with SweepProgress("terminal", 2) as bar:
        bar.advance(False)
        bar.advance(True)
        (task,) = bar._live.tasks
        assert (task.completed, task.total, task.description) == (2, 2, "sweep: 2/2 jobs, 1 failed")


def test_a_sweep_is_one_bar_for_all_its_jobs(notebook):
    with SweepProgress("notebook", 3) as bar:
        for failed in (False, True, False):
            bar.advance(failed)
    (handle,) = notebook
    text, markup = handle.shown[-1]
    assert text.startswith("sweep: 3/3 jobs, 1 failed") and "<progress value='3' max='3'" in markup
    assert [t.split(" (")[0] for t, _ in handle.shown][:2] == ["sweep: 0/3 jobs", "sweep: 1/3 jobs"]


def test_a_local_sweep_shows_its_bar_in_a_notebook(notebook, gpt2):
    with gpt2.sweep(remote=False):
        for layer in gpt2.transformer.h:
            with gpt2.trace("The Eiffel Tower"):
                layer.output.save()
    (handle,) = notebook
    assert handle.shown[-1][0].startswith("sweep: 2/2 jobs")
    with gpt2.sweep(remote=False, progress=False):
        with gpt2.trace("The Eiffel Tower"):
            gpt2.transformer.h[0].output.save()
    assert len(notebook) == 1


# -- rich displays -----------------------------------------------------------------------------------
class FakeFabric:
    """The few FabricClient calls a Job makes, answered from memory."""

    def __init__(self, record: dict[str, Any] | None = None, interrupt: bool = False) -> None:
        self.record = record
        self.interrupt = interrupt
        self.cancelled: list[str] = []

    def status(self, job_id: str) -> dict[str, Any]:
        if self.record is None:
            raise ConnectionError("the fabric is away")
        return dict(self.record)

    def wait(
        self, job_id: str, timeout: float | None = None, model: str | None = None, on_event: Any = None
    ) -> dict[str, Any]:
        if self.interrupt:
            raise KeyboardInterrupt
        return {"type": "failed", "message": "boom"}

    def cancel_quietly(self, job_ids: list[str]) -> list[str]:
        self.cancelled += job_ids
        return job_ids


def test_a_jobs_repr_asks_nothing_and_its_display_reads_its_state():
    record = {"id": "j1", "user": "u", "model": "gpt2", "state": "queued", "position": 2, "created": 100.0,
              "bytes": 1, "meta": {}}  # fmt: skip
    job = Job(FakeFabric(record), "j1")  # type: ignore[arg-type]
    assert repr(job) == "<nnfabric.Job j1>"  # nothing known yet, and nothing asked
    markup = job._repr_html_()
    assert all(f">{value}<" in markup for value in ("j1", "gpt2", "queued", "2 jobs ahead"))
    assert repr(job) == "<nnfabric.Job j1 model=gpt2 state=queued position=2>"
    printed: list[str] = []
    job._repr_pretty_(types.SimpleNamespace(text=printed.append), False)
    assert printed == [repr(job)]


def test_a_jobs_display_never_raises_when_the_fabric_is_away():
    job = Job(FakeFabric(None), "j2", model="gpt2")  # type: ignore[arg-type]
    assert "unknown (the fabric did not answer)" in job._repr_html_()
    assert repr(job) == "<nnfabric.Job j2 model=gpt2>"
    with pytest.raises(nnfabric.RemoteError, match="boom"):
        job.wait()
    assert repr(job) == "<nnfabric.Job j2 model=gpt2 state=failed>"  # the end it heard, asked nothing


def test_interrupting_a_wait_cancels_the_job():
    fabric = FakeFabric(interrupt=True)
    job = Job(fabric, "j3")  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt) as raised:
        job.wait()
    assert fabric.cancelled == ["j3"]
    assert raised.value.__notes__ == ["nnfabric: job j3 was cancelled on the fabric"]


def test_interrupting_a_sweep_cancels_its_unfinished_jobs(monkeypatch):
    fabric = FakeFabric()

    def interrupted(run: _Run) -> None:
        run.active = {"a": 0}  # accepted on the socket, running
        run.orphans = {"b": 1}  # accepted on a socket since lost
        run.posted.append(("c", 2))  # sent over HTTP
        raise KeyboardInterrupt

    monkeypatch.setattr(_Run, "over_socket", interrupted)
    sender = SocketSender(types.SimpleNamespace(cancel_quietly=fabric.cancel_quietly))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt) as raised:
        sender.run([b"x", b"y", b"z", b"w"], lambda *ended: None)
    assert fabric.cancelled == ["a", "b", "c"]
    assert raised.value.__notes__ == ["nnfabric: 3 of the sweep's jobs were cancelled on the fabric"]


def test_a_fabric_shows_its_models(monkeypatch):
    fabric = nnfabric.Fabric("http://fabric.test:8000", "nnf_secret", progress=False)
    models = [{"name": "gpt2", "state": "ready", "replicas": 1, "queue_depth": 3, "dtype": "float32"}]
    monkeypatch.setattr(fabric, "models", lambda: models)
    markup = fabric._repr_html_()
    assert "http://fabric.test:8000" in markup and "<code>gpt2</code>" in markup and "<td>3</td>" in markup
    printed: list[str] = []
    fabric._repr_pretty_(types.SimpleNamespace(text=printed.append), False)
    assert printed == ["<nnfabric.Fabric http://fabric.test:8000>\n  gpt2: ready, 1 replica(s), 3 queued"]
    assert "nnf_secret" not in markup + printed[0] + repr(fabric)  # the key is never shown

    def away() -> list[Any]:
        raise ConnectionError("refused")

    monkeypatch.setattr(fabric, "models", away)
    assert "models unknown: ConnectionError: refused" in fabric._repr_html_()


def test_a_model_says_what_it_is_and_where_it_runs(gpt2, gpt2_dir):
    local = nnfabric.LanguageModel(str(gpt2_dir), remote_name="tiny-gpt2")
    assert repr(local).splitlines()[0] == (
        "LanguageModel (GPT2LMHeadModel): runs here (cpu, float32); with remote=True on the fabric as 'tiny-gpt2'"
    )
    markup = local._repr_html_()
    assert ">tiny-gpt2<" in markup and ">GPT2LMHeadModel<" in markup and "transformer.h" not in markup
    assert "<details><summary>modules" in markup and "ln_f: LayerNorm" in markup
    fabric = nnfabric.Fabric("http://fabric.test:8000", "nnf_secret", progress=False)
    thin = nnfabric.LanguageModel(tree=ModuleTree.from_json({"type": "GPT2LMHeadModel", "children": {}}),
                                  tokenizer=gpt2.tokenizer, remote_name="gpt2", fabric=fabric)  # fmt: skip
    assert repr(thin).splitlines()[0] == (
        "LanguageModel (GPT2LMHeadModel): runs on the fabric at http://fabric.test:8000 as 'gpt2' "
        "(remote=True only: no weights here)"
    )
