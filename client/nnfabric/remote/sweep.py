"""Many jobs over one connection: a sweep's envelopes go out on one websocket (the fabric's
/v1/socket), as many at once as the key may have active, and each job's end comes back on it,
its result inline when small.

Usage::

    def ended(index, job_id, result, error): ...         # result bytes, or the RemoteError
    SocketSender(client).run(envelopes, ended)           # returns once every job has ended

Each job is still its own job on the fabric (fair share, limits, failure, result). A job the
key's caps refuse (429) or that meets a model still loading (503) is sent again once one of the
sweep's jobs has ended or after the server's Retry-After; any other refusal is that job's error.
If the connection drops, jobs not yet acknowledged are sent again (a job may then run twice:
nothing is lost) and acknowledged ones are followed over HTTP. Where the fabric refuses the
socket (a proxy without websockets), the jobs go over HTTP, a window at a time.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import RemoteError
from ..protocol import TERMINAL
from .follow import Lost

if TYPE_CHECKING:
    from .http import FabricClient

# (index of the envelope, the job's id or None if never accepted, its result envelope, its error)
Ended = Callable[[int, str | None, bytes | None, RemoteError | None], None]
# Refusals that pass: the key's caps, a model still loading, a proxy whose api is restarting.
_RETRIED = (429, 502, 503, 504)
_MAX_RETRIES = 200  # times one job is refused that way before its refusal is its error
_ID_BYTES = 32
# Larger jobs go by POST: a websocket server's message limit may be below the envelope limit
# (uvicorn's default is 16 MiB; ours is raised to match, a proxy's may not be).
_SOCKET_MAX_BYTES = 16 << 20
_FRUITLESS_CONNECTIONS = 3  # connections in a row lost before any job moved on: use HTTP


class _SocketRefused(Exception):
    """The fabric (or a proxy before it) will not take jobs on a websocket: use HTTP."""


class SocketSender:
    """Sends envelopes over one websocket within a window, and reports each job's end."""

    def __init__(self, client: FabricClient, window: int = 64, quiet_s: float = 20.0) -> None:
        self.client = client
        self.window = max(1, window)  # the key's max_active by default; narrowed when the fabric says so
        self.quiet_s = quiet_s  # silence after which the jobs' records are read (an end missed)

    def run(self, envelopes: list[bytes], ended: Ended) -> None:
        run = _Run(self, envelopes, ended)
        try:
            try:
                run.over_socket()
            except _SocketRefused:
                run.connection_lost()
            run.todo.extend(run.by_http)
            run.over_http()
            run.follow_orphans()
        except KeyboardInterrupt as interrupt:
            # Ctrl-C or a notebook's stop button: the sweep's jobs that are still queued or
            # running stop too (jobs sent but not yet acknowledged have no id to cancel by).
            cancelled = self.client.cancel_quietly(run.unfinished())
            if cancelled:
                interrupt.add_note(f"nnfabric: {len(cancelled)} of the sweep's jobs were cancelled on the fabric")
            raise


class _Run:
    def __init__(self, sender: SocketSender, envelopes: list[bytes], ended: Ended) -> None:
        self.client = sender.client
        self.window = sender.window
        self.quiet_s = sender.quiet_s
        self.envelopes = envelopes
        self.ended = ended
        small = [len(envelope) <= _SOCKET_MAX_BYTES for envelope in envelopes]
        self.todo: deque[int] = deque(i for i, fits in enumerate(small) if fits)  # not sent yet (or to send again)
        self.by_http = [i for i, fits in enumerate(small) if not fits]
        self.sent: deque[int] = deque()  # sent on this socket, not yet accepted or refused
        self.active: dict[str, int] = {}  # accepted on this socket and not ended: job id -> index
        self.orphans: dict[str, int] = {}  # accepted on a socket since lost: followed over HTTP
        self.inline: dict[str, int] = {}  # completed, its result's frame still to come: job id -> index
        self.refusals: dict[int, int] = {}
        self.paused_until = 0.0  # no sending before this (a Retry-After)
        self.held = False  # the key's cap is full: no sending until one of our jobs ends
        self.moved = False  # a job was answered on this connection
        self.posted: deque[tuple[str, int]] = deque()  # sent over HTTP, not yet followed to its end

    def unfinished(self) -> list[str]:
        """The ids of accepted jobs whose end was not heard yet."""
        return [*self.active, *self.orphans, *(job_id for job_id, _ in self.posted)]

    # -- the socket ----------------------------------------------------------------------------
    def over_socket(self) -> None:
        lost = Lost(self.client.reconnect_s, self.client.url, "of this sweep")
        fruitless = 0
        while self.todo or self.sent or self.active or self.inline:
            opened = self.moved = False
            try:
                with self._connect() as ws:
                    opened = True
                    lost.reset()
                    self._exchange(ws)
                    return
            except (OSError, _Dropped):
                self.connection_lost()
                if opened:  # a connection that opened and was lost before any job moved on
                    fruitless = 0 if self.moved else fruitless + 1
                if fruitless >= _FRUITLESS_CONNECTIONS:
                    raise _SocketRefused() from None  # the socket drops whatever we send: HTTP
                lost.wait(None)  # the api is away (restarting): ride it out, up to reconnect_s

    def connection_lost(self) -> None:
        """Unacknowledged envelopes go again; accepted jobs are followed over HTTP."""
        self.todo.extendleft(reversed(self.sent))
        self.sent.clear()
        self.orphans.update(self.active)
        self.orphans.update(self.inline)
        self.active.clear()
        self.inline.clear()
        self.held = False

    def _connect(self) -> Any:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            return connect(
                f"{url}/v1/socket",
                additional_headers={"Authorization": f"Bearer {self.client.api_key}"},
                open_timeout=10,
                compression=None,  # envelopes and results are mostly tensors: deflate costs CPU for nothing
                max_size=None,
                proxy=self.client.websocket_proxy,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (502, 503, 504):
                raise _Dropped() from None
            raise _SocketRefused() from None

    def _exchange(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while self.todo or self.sent or self.active or self.inline:
                self._send_some(ws)
                try:
                    frame = ws.recv(timeout=self._wait_s())
                except TimeoutError:
                    self._quiet_spell()
                    continue
                self._take(frame)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code == 4401:
                raise RemoteError(f"the fabric refused the sweep's connection: {exc.rcvd.reason}") from None  # type: ignore[union-attr]
            if code in (4429, 1009):
                # Every event stream of the key is in use, or a job is over the server's
                # message limit: the rest go over HTTP (which refuses a job too large with 413).
                raise _SocketRefused() from None
            raise _Dropped() from None

    def _send_some(self, ws: Any) -> None:
        while self.todo and not self.held and time.monotonic() >= self.paused_until:
            if len(self.sent) + len(self.active) + len(self.inline) >= self.window:
                return
            index = self.todo.popleft()
            self.sent.append(index)  # before sending: if the send fails, it is sent again
            ws.send(self.envelopes[index])

    def _wait_s(self) -> float:
        if self.todo and not self.held and self.paused_until > time.monotonic():
            return max(0.01, min(self.quiet_s, self.paused_until - time.monotonic()))
        return self.quiet_s

    def _take(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            job_id = frame[:_ID_BYTES].decode("ascii", "replace")
            index = self.inline.pop(job_id, None)
            if index is not None:
                self.ended(index, job_id, frame[_ID_BYTES:], None)
            return
        message = json.loads(frame)
        kind = message.get("type")
        if "job" in message:
            self._event(message)
        elif kind == "accepted" and self.sent:
            self.active[message["id"]] = self.sent.popleft()
            self.moved = True
        elif kind == "rejected" and self.sent:
            self._refused(self.sent.popleft(), message)
            self.moved = True

    def _refused(self, index: int, message: dict[str, Any]) -> None:
        status = message.get("status")
        self.refusals[index] = self.refusals.get(index, 0) + 1
        if status in _RETRIED and self.refusals[index] <= _MAX_RETRIES:
            self.todo.appendleft(index)
            if self.active or self.inline:
                self.held = True  # wait for one of ours to end: it frees a place under the cap
                self.window = max(1, len(self.active) + len(self.inline))
            else:
                self.paused_until = time.monotonic() + float(message.get("retry_after") or 1.0)
            return
        error = RemoteError(str(message.get("detail")), None, message.get("node"), status, message.get("trace"))
        self.ended(index, None, None, error)

    def _event(self, event: dict[str, Any]) -> None:
        job_id = event["job"]
        if event.get("type") not in TERMINAL or job_id not in self.active:
            return
        index = self.active.pop(job_id)
        self.held = False
        if event["type"] == "completed" and event.get("inline"):
            self.inline[job_id] = index  # its result is a binary frame that follows
            return
        self._final(job_id, index, event)

    def _quiet_spell(self) -> None:
        """No frame for a while: read the records of our running jobs, in case an end was missed."""
        for job_id in list(self.active):
            try:
                record = self.client.retrying(lambda job_id=job_id: self.client.status(job_id), job_id)  # type: ignore[misc]
            except RemoteError as error:
                if error.status == 404:  # its record is gone (expired): its end will never come
                    self.ended(self.active.pop(job_id), job_id, None, error)
                    self.held = False
                continue  # the api or Redis is away for a moment: ask again after the next quiet spell
            if record["state"] in TERMINAL:
                index = self.active.pop(job_id)
                self.held = False
                self._final(job_id, index, {"type": record["state"], "message": record.get("error"),
                                            "node": record.get("error_node"), "trace": record.get("error_trace")})

    def _final(self, job_id: str, index: int, event: dict[str, Any]) -> None:
        """A job's end heard without its result inline: fetch the result, or report its error."""
        if event["type"] == "completed":
            try:
                result = self.client.result(job_id)
            except RemoteError as unfetched:  # e.g. expired meanwhile: this job's error, not the sweep's
                self.ended(index, job_id, None, unfetched)
                return
            self.ended(index, job_id, result, None)
            return
        reason = event.get("message") or event.get("error") or event["type"]
        error = RemoteError(f"job {job_id} {event['type']}: {reason}", None, _int(event.get("node")),
                            None, _int(event.get("trace")))  # fmt: skip
        self.ended(index, job_id, None, error)

    # -- without a socket ----------------------------------------------------------------------
    def over_http(self) -> None:
        """One POST per job, a window at a time; each followed as nnfabric follows any job."""
        running = self.posted
        while self.todo:
            index = self.todo.popleft()
            try:
                envelope = self.envelopes[index]
                reply = self.client.retrying(lambda envelope=envelope: self.client.submit(envelope), "of this sweep")  # type: ignore[misc]
                running.append((reply["id"], index))
            except RemoteError as error:
                self.refusals[index] = self.refusals.get(index, 0) + 1
                if error.status not in _RETRIED or self.refusals[index] > _MAX_RETRIES:
                    self.ended(index, None, None, error)
                    continue
                self.todo.appendleft(index)
                if running:
                    self._wait_http(*running[0])
                    running.popleft()
                else:
                    time.sleep(1.0)
        while running:
            self._wait_http(*running[0])
            running.popleft()

    def follow_orphans(self) -> None:
        for job_id, index in list(self.orphans.items()):
            self._wait_http(job_id, index)
            del self.orphans[job_id]

    def _wait_http(self, job_id: str, index: int) -> None:
        try:
            event = self.client.wait(job_id, show=False)  # the sweep's bar shows it
        except RemoteError as error:  # its record is gone (expired) or the api refuses: this job's error
            self.ended(index, job_id, None, error)
            return
        self._final(job_id, index, event)


class _Dropped(Exception):
    """The connection was lost (or the api is restarting): reconnect."""


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
