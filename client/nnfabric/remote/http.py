"""Talking to the fabric over HTTP: a job's submission, state, result (resumable), cancellation,
the model catalog and persistent edits.

Usage::

    client = FabricClient("http://127.0.0.1:8000", api_key="nnf_...")
    reply = client.submit(envelope_bytes)          # {"id": ..., "position": ...}
    client.wait(reply["id"]); data = client.result(reply["id"])

Researchers use `nnfabric.connect()` and `fabric.model(name)` (nnfabric.fabric), which build on
this. Following a job's events is `remote.follow`; the connection settings `remote.config`; the
job handle `remote.job`; the backend that runs traces on the fabric `backends.remote`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import httpx

from ..errors import RemoteError
from ..graph.ir import SourceLine
from ..protocol import CancelReply, EditRecord, JobRecord, ModelInfo, ModelStructure, SubmitReply
from .display import progress_mode
from .follow import JobFollower, Lost, websocket_proxy

T = TypeVar("T")


class FabricClient:
    """A connection to one fabric with one API key."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, progress: bool | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
        # None: show progress where someone watches (a notebook, a terminal); False: never (remote.display)
        self.progress = progress
        # Results that came inline on a job's events websocket, until result() takes them.
        self._inline: dict[str, bytes] = {}
        # How long a wait rides out losing the api (a restart, a dropped connection).
        self.reconnect_s = 60.0
        self.websocket_proxy = websocket_proxy(self.url)

    def retrying(self, call: Callable[[], T], job_id: str) -> T:
        """`call`, retried while the api cannot be reached (for up to reconnect_s)."""
        lost = Lost(self.reconnect_s, self.url, job_id)
        while True:
            try:
                return call()
            except httpx.TransportError:
                lost.wait(None)

    def __repr__(self) -> str:
        return f"<nnfabric.Fabric {self.url}>"

    def structure(self, name: str) -> ModelStructure:
        return cast(ModelStructure, self._get(f"/v1/models/{name}/structure"))

    def tokenizer_files(self, name: str) -> dict[str, str]:
        files: dict[str, str] = self._get(f"/v1/models/{name}/tokenizer")["files"]
        return files

    def jobs(self, limit: int = 20) -> list[JobRecord]:
        """This key's user's recent jobs, newest first."""
        return cast(list[JobRecord], self._get(f"/v1/jobs?limit={limit}"))

    def models(self) -> list[ModelInfo]:
        return cast(list[ModelInfo], self._get("/v1/models"))

    def _get(self, path: str) -> Any:
        response = self.http.get(path)
        raise_for(response)
        return response.json()

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, body: bytes) -> SubmitReply:
        response = self.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
        raise_for(response)
        return cast(SubmitReply, response.json())

    def status(self, job_id: str) -> JobRecord:
        return cast(JobRecord, self._get(f"/v1/jobs/{job_id}"))

    def result(self, job_id: str) -> bytes:
        """The result envelope; a large one is streamed with a byte count on the terminal."""
        inline = self._inline.pop(job_id, None)
        if inline is not None:
            return inline
        received = _Received()  # kept across retries: a dropped download resumes with Range
        return self.retrying(lambda: self._download(job_id, received), job_id)

    def _download(self, job_id: str, received: _Received) -> bytes:
        headers = {"Range": f"bytes={received.size}-"} if received.size else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/result", headers=headers) as response:
            if not response.is_success:
                response.read()
                raise_for(response)
            if response.status_code != 206:
                received.size = 0  # the server sent it whole (a small result kept in Redis)
            total = received.size + int(response.headers.get("content-length") or 0)
            received.reserve(total)
            if progress_mode(self.progress) != "terminal" or total < (4 << 20):
                for chunk in response.iter_bytes():
                    received.add(chunk)
                return received.value()
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as bar:
                task = bar.add_task(f"job {job_id[:8]}: result", total=total, completed=received.size)
                for chunk in response.iter_bytes():
                    received.add(chunk)
                    bar.advance(task, len(chunk))
            return received.value()

    # -- persistent edits ------------------------------------------------------------------
    def add_edit(self, model: str, body: bytes) -> EditRecord:
        """Register an edit (an envelope of one edit graph) for this user's jobs on `model`."""
        response = self.http.post(
            f"/v1/models/{model}/edits", content=body, headers={"Content-Type": "application/octet-stream"}
        )
        raise_for(response)
        return cast(EditRecord, response.json())

    def edits(self, model: str) -> list[EditRecord]:
        """This user's registered edits on `model`."""
        return cast(list[EditRecord], self._get(f"/v1/models/{model}/edits"))

    def remove_edit(self, model: str, edit_id: str) -> None:
        response = self.http.delete(f"/v1/models/{model}/edits/{edit_id}")
        raise_for(response)

    def cancel(self, job_id: str, timeout: float | None = None) -> CancelReply:
        response = self.http.delete(f"/v1/jobs/{job_id}", timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
        raise_for(response)
        return cast(CancelReply, response.json())

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        model: str | None = None,
        show: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the job's events until it ends (websocket; polling where websockets are refused).
        A dropped connection or an api restart is ridden out: the stream resumes after the last
        event seen, retrying for up to `reconnect_s` seconds without contact. `show=False`: no
        progress line of its own (a sweep shows one bar for all its jobs)."""
        return JobFollower(self).wait(job_id, timeout, model, show, on_event)

    def cancel_quietly(self, job_ids: list[str]) -> list[str]:
        """Cancel these jobs after an interrupt (Ctrl-C, a notebook's stop button): the ones this
        cancelled. A job that already ended, or a fabric that does not answer in a few seconds,
        is passed over: the user asked to stop, not to wait."""
        cancelled = []
        for job_id in job_ids:
            try:
                self.cancel(job_id, timeout=5.0)
            except (RemoteError, httpx.HTTPError):
                continue
            cancelled.append(job_id)
        return cancelled

    def keep_inline(self, job_id: str, data: str | bytes) -> None:
        """A result that came inline on the job's events, until `result()` takes it."""
        if isinstance(data, bytes):
            while len(self._inline) >= 8:  # only results nobody collected linger; keep a few
                self._inline.pop(next(iter(self._inline)))
            self._inline[job_id] = data


class _Received:
    """A download's bytes so far, in one buffer sized from Content-Length (a growing buffer
    would copy a result of hundreds of MiB dozens of times as it grows)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.size = 0

    def reserve(self, total: int) -> None:
        if not self.buffer:
            self.buffer = bytearray(total)
        elif total > len(self.buffer):
            self.buffer.extend(bytes(total - len(self.buffer)))

    def add(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if end > len(self.buffer):
            self.buffer.extend(bytes(end - len(self.buffer)))
        self.buffer[self.size : end] = chunk
        self.size = end

    def value(self) -> bytes:
        return bytes(memoryview(self.buffer)[: self.size])


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    detail = body.get("detail", body) if isinstance(body, dict) else body
    line = body.get("line") if isinstance(body, dict) else None
    source = SourceLine(line["file"], line["line"], line.get("code", "")) if isinstance(line, dict) else None
    node = body.get("node") if isinstance(body, dict) else None
    trace = body.get("trace") if isinstance(body, dict) else None
    raise RemoteError(f"{response.status_code}: {detail}", source, node, status=response.status_code, trace=trace)
