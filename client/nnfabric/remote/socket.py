"""One websocket per connection for submitting jobs and receiving their results: one round
trip per job (the fabric's /v1/socket).

Usage::

    with JobSocket("http://127.0.0.1:8000", api_key) as jobs:
        job_id = jobs.submit(envelope)          # the fabric's answer: accepted, or RemoteError
        result = jobs.result(job_id)            # the result envelope, inline or fetched
        jobs.cancel(other_id)

Jobs may be submitted back to back before any result is read; events of every job arrive on
the one socket, and those of jobs nobody waits on yet are kept until asked for.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from ..errors import RemoteError
from ..protocol import TERMINAL


class JobSocket:
    def __init__(self, url: str, api_key: str, timeout: float = 300.0) -> None:
        from websockets.sync.client import connect

        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        ws_url = self.url.replace("http", "ws", 1) + "/v1/socket"
        self._ws = connect(ws_url, additional_headers={"Authorization": f"Bearer {api_key}"}, max_size=None)
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._results: dict[str, bytes] = {}
        self._replies: list[dict[str, Any]] = []

    def __enter__(self) -> JobSocket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._ws.close()

    def submit(self, envelope: bytes) -> str:
        """Send a job; its id once the fabric accepted it (RemoteError with the reason if not)."""
        self._ws.send(envelope)
        deadline = time.monotonic() + self.timeout
        while not self._replies:
            self._read(deadline)
        reply = self._replies.pop(0)
        if reply["type"] == "rejected":
            raise RemoteError(str(reply.get("detail")), None, reply.get("node"), reply.get("status"), reply.get("trace"))
        job_id: str = reply["id"]
        return job_id

    def cancel(self, job_id: str) -> None:
        self._ws.send(json.dumps({"cancel": job_id}))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events received so far."""
        return list(self._events.get(job_id, []))

    def result(self, job_id: str, timeout: float | None = None) -> bytes:
        """Wait for the job to end; its result envelope (RemoteError if it failed or was cancelled)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            final = next((e for e in self._events.get(job_id, []) if e["type"] in TERMINAL), None)
            if final is not None and (final["type"] != "completed" or not final.get("inline") or job_id in self._results):
                break
            self._read(deadline)
        if final["type"] != "completed":
            reason = final.get("message") or final.get("error") or final["type"]
            raise RemoteError(f"job {job_id} {final['type']}: {reason}", None, final.get("node"), None, final.get("trace"))
        if job_id in self._results:
            return self._results.pop(job_id)
        response = httpx.get(f"{self.url}/v1/jobs/{job_id}/result", headers={"Authorization": f"Bearer {self.api_key}"},
                             timeout=self.timeout)  # fmt: skip
        response.raise_for_status()
        return response.content

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from the fabric in time")
        frame = self._ws.recv(timeout=remaining)
        if isinstance(frame, bytes):
            job_id = frame[:32].decode()
            self._results[job_id] = frame[32:]
            return
        message = json.loads(frame)
        if message.get("type") in ("accepted", "rejected"):
            self._replies.append(message)
        elif "job" in message:
            self._events.setdefault(message["job"], []).append(message)
