"""Talking to the fabric over HTTP: submit a job, follow its events, fetch its saved values.

Usage::

    client = FabricClient("http://127.0.0.1:8000", api_key="nnf_...")
    reply = client.submit(envelope_bytes)          # {"id": ..., "position": ...}
    client.wait(reply["id"]); data = client.result(reply["id"])
    backend = RemoteBackend(client, "gpt2")       # what `remote=True` runs on

Researchers use `nnfabric.connect()` and `fabric.model(name)` (nnfabric.fabric), which build on
this. Nothing here knows the model or tracing classes: a job arrives as a `JobRequest`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx

from ..backends import Edit, JobRequest
from ..errors import RemoteError
from ..graph.ir import Graph, SourceLine
from ..protocol import TERMINAL, CancelReply, EditRecord, JobRecord, ModelInfo, ModelStructure, SubmitReply

_default: FabricClient | None = None
T = TypeVar("T")


class FabricClient:
    """A connection to one fabric with one API key."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, progress: bool | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
        self.progress = sys.stderr.isatty() if progress is None else progress
        # Results that came inline on a job's events websocket, until result() takes them.
        self._inline: dict[str, bytes] = {}
        # How long a wait rides out losing the api (a restart, a dropped connection).
        self.reconnect_s = 60.0
        self._ws_proxy = _websocket_proxy(self.url)

    def _retrying(self, call: Callable[[], T], job_id: str) -> T:
        """`call`, retried while the api cannot be reached (for up to reconnect_s)."""
        lost = _Lost(self.reconnect_s, self.url, job_id)
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
        _raise_for(response)
        return response.json()

    # -- jobs ----------------------------------------------------------------------------
    def submit(self, body: bytes) -> SubmitReply:
        response = self.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/octet-stream"})
        _raise_for(response)
        return cast(SubmitReply, response.json())

    def status(self, job_id: str) -> JobRecord:
        return cast(JobRecord, self._get(f"/v1/jobs/{job_id}"))

    def result(self, job_id: str) -> bytes:
        """The result envelope; a large one is streamed with a byte count on the terminal."""
        inline = self._inline.pop(job_id, None)
        if inline is not None:
            return inline
        received = bytearray()  # kept across retries: a dropped download resumes with Range
        return self._retrying(lambda: self._download(job_id, received), job_id)

    def _download(self, job_id: str, received: bytearray) -> bytes:
        headers = {"Range": f"bytes={len(received)}-"} if received else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/result", headers=headers) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            if response.status_code != 206:
                received.clear()  # the server sent it whole (a small result kept in Redis)
            total = len(received) + int(response.headers.get("content-length") or 0)
            if not self.progress or total < (4 << 20):
                for chunk in response.iter_bytes(1 << 20):
                    received += chunk
                return bytes(received)
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()) as bar:
                task = bar.add_task(f"job {job_id[:8]}: result", total=total, completed=len(received))
                for chunk in response.iter_bytes(1 << 20):
                    received += chunk
                    bar.advance(task, len(chunk))
            return bytes(received)

    # -- persistent edits ------------------------------------------------------------------
    def add_edit(self, model: str, body: bytes) -> EditRecord:
        """Register an edit (an envelope of one edit graph) for this user's jobs on `model`."""
        response = self.http.post(
            f"/v1/models/{model}/edits", content=body, headers={"Content-Type": "application/octet-stream"}
        )
        _raise_for(response)
        return cast(EditRecord, response.json())

    def edits(self, model: str) -> list[EditRecord]:
        """This user's registered edits on `model`."""
        return cast(list[EditRecord], self._get(f"/v1/models/{model}/edits"))

    def remove_edit(self, model: str, edit_id: str) -> None:
        response = self.http.delete(f"/v1/models/{model}/edits/{edit_id}")
        _raise_for(response)

    def cancel(self, job_id: str) -> CancelReply:
        response = self.http.delete(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return cast(CancelReply, response.json())

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Follow the job's events until it ends (websocket; polling where websockets are refused).
        A dropped connection or an api restart is ridden out: the stream resumes after the last
        event seen, retrying for up to `reconnect_s` seconds without contact."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with _Progress(self.progress, job_id) as progress:
            final = self._follow(job_id, deadline, progress)
            if final is None:
                final = self._poll(job_id, deadline, progress)
        return final

    def _follow(self, job_id: str, deadline: float | None, progress: _Progress) -> dict[str, Any] | None:
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect

        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        after = "0-0"
        lost = _Lost(self.reconnect_s, self.url, job_id)
        while True:
            final: dict[str, Any] | None = None
            try:
                with connect(
                    f"{ws_url}/v1/jobs/{job_id}/events?after={after}&result=inline",
                    additional_headers={"Authorization": f"Bearer {self.api_key}"},
                    open_timeout=10,
                    compression=None,  # results are tensors, which do not deflate; compressing costs CPU both sides
                    max_size=None,
                    proxy=self._ws_proxy,
                ) as ws:
                    lost.reset()
                    while True:
                        remaining = _remaining(deadline, job_id)
                        event: dict[str, Any] = json.loads(ws.recv(timeout=remaining))
                        after = event["id"]
                        progress.show(event)
                        if event["type"] in TERMINAL:
                            final = dict(event)
                            if event.get("inline"):  # the result follows as one binary frame
                                self._keep_inline(job_id, ws.recv(timeout=remaining))
                            return final
            except ConnectionClosed as exc:
                if final is not None:
                    return final  # the inline result went with the connection: result() fetches it
                if exc.rcvd is not None and exc.rcvd.code == 4429:
                    return None  # this key's event streams are all in use: poll instead
                if exc.rcvd is not None and 4000 <= exc.rcvd.code < 4500:
                    raise RemoteError(f"the fabric closed the event stream: {exc.rcvd.reason}") from None
            except InvalidStatus as exc:
                if exc.response.status_code not in (502, 503, 504):
                    return None  # websockets refused on the way (a proxy): poll instead
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            except OSError:
                pass  # refused or reset: the api may be restarting
            lost.wait(deadline)  # then resume from the last event seen: nothing is lost

    def _keep_inline(self, job_id: str, data: str | bytes) -> None:
        if isinstance(data, bytes):
            while len(self._inline) >= 8:  # only results nobody collected linger; keep a few
                self._inline.pop(next(iter(self._inline)))
            self._inline[job_id] = data

    def _poll(self, job_id: str, deadline: float | None, progress: _Progress) -> dict[str, Any]:
        delay = 0.05
        while True:
            job = self._retrying(lambda: self.status(job_id), job_id)
            progress.show({"type": job["state"], "position": job.get("position")})
            if job["state"] in TERMINAL:
                return {
                    "type": job["state"],
                    "message": job.get("error"),
                    "node": _int(job.get("error_node")),
                    "trace": _int(job.get("error_trace")),
                }
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish in time")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


class _Lost:
    """Time without contact with the api, and the pause before the next try."""

    def __init__(self, limit_s: float, url: str, job_id: str) -> None:
        self.limit_s = limit_s
        self.url = url
        self.job_id = job_id
        self.reset()

    def reset(self) -> None:
        self.since: float | None = None
        self.delay = 0.1

    def wait(self, deadline: float | None) -> None:
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > self.limit_s:
            raise RemoteError(
                f"lost contact with the fabric at {self.url} for {self.limit_s:.0f} s while waiting for job "
                f"{self.job_id}; it may still finish: nnfabric.job({self.job_id!r}).wait()"
            )
        if deadline is not None and now >= deadline:
            raise TimeoutError(f"job {self.job_id} did not finish in time")
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 2.0)


def _remaining(deadline: float | None, job_id: str) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job_id} did not finish in time")
    return remaining


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Progress:
    """Queue position and state on the terminal, with rich; silent when not a terminal."""

    def __init__(self, enabled: bool, job_id: str) -> None:
        self.enabled = enabled
        self.job_id = job_id
        self._status: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status(f"job {self.job_id[:8]}: submitted")
            self._status.start()
        return self

    def show(self, event: dict[str, Any]) -> None:
        if self._status is None:
            return
        kind = event.get("type")
        if kind == "queued":
            text = f"queued, position {event.get('position')}"
        elif kind == "log":
            text = str(event.get("message"))
        else:
            text = str(kind)
        self._status.update(f"job {self.job_id[:8]}: {text}")

    def __exit__(self, *exc: Any) -> None:
        if self._status is not None:
            self._status.stop()


def _websocket_proxy(url: str) -> str | None:
    """The proxy the environment names for this fabric's websockets, looked up once per
    connection rather than once per job (reading the environment costs more than the job's
    own client-side work)."""
    from websockets.proxy import get_proxy
    from websockets.uri import parse_uri

    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    try:
        return get_proxy(parse_uri(ws_url))
    except Exception:  # an odd URL: connect() reports it with its own message
        return None


def _raise_for(response: httpx.Response) -> None:
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


def config_path() -> Path:
    """~/.config/nnfabric/config.toml (or under $XDG_CONFIG_HOME), written by `nnfabric login`."""
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "nnfabric" / "config.toml"


def read_config() -> dict[str, str]:
    import tomllib

    path = config_path()
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        data = tomllib.load(f)
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key")}


def write_config(url: str, api_key: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON string escapes are valid TOML basic strings.
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the key is a secret
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def connection_settings(url: str | None = None, api_key: str | None = None) -> tuple[str, str]:
    """Each of url and api_key: the argument, else NNFABRIC_URL / NNFABRIC_API_KEY, else
    ~/.config/nnfabric/config.toml."""
    config = read_config()
    url = url or os.environ.get("NNFABRIC_URL") or config.get("url")
    api_key = api_key or os.environ.get("NNFABRIC_API_KEY") or config.get("api_key")
    if not url or not api_key:
        raise ValueError(
            "connect() needs a URL and an API key: pass them, set NNFABRIC_URL and NNFABRIC_API_KEY, "
            "or run `nnfabric login`"
        )
    return url, api_key


def set_default(client: FabricClient) -> None:
    global _default
    _default = client


def default_fabric() -> FabricClient:
    """The connection `remote=True` uses when a model names none: the last `connect()`, else one
    made from the environment or the config file."""
    if _default is None:
        set_default(FabricClient(*connection_settings()))
    assert _default is not None
    return _default


class Job:
    """A job on the fabric. `blocking=False` traces return at once with `tracer.job`:

        job.status()          # {"state": "queued", "position": 3, ...}
        job.wait(timeout=60)  # until it ends; the trace's saved proxies then have their values
        job.result()          # {"hidden": tensor, ...}: saved values by their variable names
        job.cancel()

    `nnfabric.job(job_id)` reattaches from another process (then `result()` is the way in).
    """

    def __init__(self, fabric: FabricClient, job_id: str, request: JobRequest | None = None) -> None:
        self.fabric = fabric
        self.id = job_id
        self._request = request
        self._values: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<nnfabric.Job {self.id}>"

    def status(self) -> JobRecord:
        return self.fabric.status(self.id)

    def cancel(self) -> CancelReply:
        return self.fabric.cancel(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        """Wait until the job ends; raise RemoteError (at your line) if it failed."""
        if self._values is not None:
            return self
        final = self.fabric.wait(self.id, timeout)
        if final["type"] != "completed":
            node, trace = final.get("node"), final.get("trace")
            message = final.get("message") or f"job {final['type']}"
            line = self._request.line(trace, node) if self._request else None
            raise RemoteError(f"{message} (job {self.id})", line, node, trace=trace)
        from ..runtime.wire import split_saved, unpack_values

        self._values = unpack_values(self.fabric.result(self.id))
        if self._request is not None:
            per_trace = split_saved(self._values, len(self._request.graphs))
            self._request.deliver(per_trace)
        return self

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The saved values by the names they had in the submitting code (waits if needed)."""
        self.wait(timeout)
        assert self._values is not None
        names = self.status().get("meta", {}).get("names") or {}
        if not names:
            return dict(self._values)
        values = self._values
        return {
            name: [values.get(k) for k in key] if isinstance(key, list) else values.get(key)
            for name, key in names.items()
        }


class RemoteBackend:
    """`remote=True`: the job runs on the fabric as model `name`."""

    def __init__(self, fabric: FabricClient, name: str) -> None:
        self.fabric = fabric
        self.name = name

    def run(self, request: JobRequest) -> Job:
        from ..runtime.wire import pack_job

        extra: dict[str, Any] = {"model": self.name, "names": request.names}
        if request.edits:
            extra["edits"] = [self.register(edit) for edit in request.edits]
        body = pack_job(request.graphs, request.tensors, request.session, extra)
        job = Job(self.fabric, "", request)
        try:
            job.id = self.fabric.submit(body)["id"]
        except RemoteError as error:
            line = request.line(error.trace, error.node) or error.line
            raise RemoteError(error.reason, line, error.node, error.status, error.trace) from None
        if request.blocking:
            job.wait()
        return job

    def register(self, edit: Edit) -> str:
        """The edit's id on this fabric for this model, registering it the first time."""
        from ..runtime.wire import pack_job

        where = (self.fabric.url, self.name)
        if where not in edit.registered:
            body = pack_job([edit.graph], edit.tensors, False, {"model": self.name})
            try:
                edit.registered[where] = self.fabric.add_edit(self.name, body)["id"]
            except RemoteError as error:
                node = error.node if _node_in(edit.graph, error.node) else None
                line = error.line or (edit.graph.nodes[node].line if node is not None else None)
                raise RemoteError(error.reason, line, error.node, error.status, error.trace) from None
        return edit.registered[where]


def _node_in(graph: Graph, node: int | None) -> bool:
    return isinstance(node, int) and 0 <= node < len(graph.nodes)
