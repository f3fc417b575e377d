"""Following a job until it ends: its events on a websocket (resumed after the last event seen
when the connection drops or the api restarts), polling its record where websockets are refused,
and its state shown meanwhile (a line in a notebook, on a terminal).

Usage::

    final = JobFollower(client).wait(job_id, timeout=600)    # {"type": "completed", ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import RemoteError
from ..protocol import TERMINAL
from .display import JobProgress, progress_mode

if TYPE_CHECKING:
    from .http import FabricClient


class JobFollower:
    """One job's events, through one fabric connection."""

    def __init__(self, client: FabricClient) -> None:
        self.client = client

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        model: str | None = None,
        show: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The job's final event, followed until it ends (its state shown meanwhile: remote.display);
        `on_event` hears every event on the way (a streaming generation's `tokens`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        mode = progress_mode(self.client.progress) if show else None
        with JobProgress(mode, job_id, model) as progress:
            final = self._follow(job_id, deadline, progress, on_event)
            if final is None:
                final = self._poll(job_id, deadline, progress)
        return final

    def _follow(
        self,
        job_id: str,
        deadline: float | None,
        progress: JobProgress,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any] | None:
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect

        ws_url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        after = "0-0"
        lost = Lost(self.client.reconnect_s, self.client.url, job_id)
        while True:
            final: dict[str, Any] | None = None
            try:
                with connect(
                    f"{ws_url}/v1/jobs/{job_id}/events?after={after}&result=inline",
                    additional_headers={"Authorization": f"Bearer {self.client.api_key}"},
                    open_timeout=10,
                    compression=None,  # results are tensors, which do not deflate; compressing costs CPU both sides
                    max_size=None,
                    proxy=self.client.websocket_proxy,
                ) as ws:
                    lost.reset()
                    while True:
                        remaining = _remaining(deadline, job_id)
                        event: dict[str, Any] = json.loads(ws.recv(timeout=remaining))
                        after = event["id"]
                        progress.show(event)
                        if on_event is not None:
                            on_event(event)
                        if event["type"] in TERMINAL:
                            final = dict(event)
                            if event.get("inline"):  # the result follows as one binary frame
                                self.client.keep_inline(job_id, ws.recv(timeout=remaining))
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

    def _poll(self, job_id: str, deadline: float | None, progress: JobProgress) -> dict[str, Any]:
        delay = 0.05
        while True:
            job = self.client.retrying(lambda: self.client.status(job_id), job_id)
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


class Lost:
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


def websocket_proxy(url: str) -> str | None:
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
