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
from nnfabric.errors import RemoteError
from nnfabric.protocol import TERMINAL


class JobSocket:
    def __init__(self, url: str, api_key: str, timeout: float = 300.0, quiet_s: float = 20.0) -> None:
        from websockets.sync.client import connect

        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.quiet_s = quiet_s  # silence after which a waiting result() checks the job's record
        ws_url = self.url.replace("http", "ws", 1) + "/v1/socket"
        self._ws = connect(ws_url, additional_headers={"Authorization": f"Bearer {api_key}"}, max_size=None,
                           compression=None)  # fmt: skip
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
            if not self._read(deadline):
                raise TimeoutError(f"the fabric did not answer the submission within {self.timeout:g} s")
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
            if not self._read(min(deadline, time.monotonic() + self.quiet_s)):
                # A quiet spell: ask for the job's record once, in case its end was not heard here.
                final = self._final_from_record(job_id)
                if final is not None:
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} did not end within {timeout or self.timeout:g} s")
        if final["type"] != "completed":
            reason = final.get("message") or final.get("error") or final["type"]
            raise RemoteError(f"job {job_id} {final['type']}: {reason}", None, final.get("node"), None, final.get("trace"))
        if job_id in self._results:
            return self._results.pop(job_id)
        response = self._http("GET", f"/v1/jobs/{job_id}/result")
        response.raise_for_status()
        return response.content

    def _final_from_record(self, job_id: str) -> dict[str, Any] | None:
        response = self._http("GET", f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            return None
        record = response.json()
        if record.get("state") not in TERMINAL:
            return None
        return {"type": record["state"], "message": record.get("error"), "node": record.get("error_node"),
                "trace": record.get("error_trace")}  # fmt: skip

    def _http(self, method: str, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=self.timeout)

    def _read(self, until: float) -> bool:
        """Take one frame off the socket; False if none came before `until`."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return False
        try:
            frame = self._ws.recv(timeout=remaining)
        except TimeoutError:
            return False
        if isinstance(frame, bytes):
            job_id = frame[:32].decode()
            self._results[job_id] = frame[32:]
            return True
        message = json.loads(frame)
        if message.get("type") in ("accepted", "rejected"):
            self._replies.append(message)
        elif "job" in message:
            self._events.setdefault(message["job"], []).append(message)
        return True
