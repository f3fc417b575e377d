"""A job on the fabric, as a researcher holds it: its state, its end, its saved values.

Usage::

    job = tracer.job                 # a `blocking=False` trace returns at once with it
    job.wait(timeout=600)            # then the trace's saved proxies have their values
    nnfabric.job(job_id).result()    # from any process: {"hidden": tensor, ...}
    job                              # in a notebook: a table of its id, model, state, position

Interrupting a wait (Ctrl-C, a notebook's stop button) cancels the job on the fabric.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import RemoteError
from ..protocol import TERMINAL, CancelReply, JobRecord
from .display import elapsed, html_table

if TYPE_CHECKING:
    from ..backends import JobRequest
    from .http import FabricClient


class Job:
    """A job on the fabric. `blocking=False` traces return at once with `tracer.job`:

        job.status()          # {"state": "queued", "position": 3, ...}
        job.wait(timeout=60)  # until it ends; the trace's saved proxies then have their values
        job.result()          # {"hidden": tensor, ...}: saved values by their variable names
        job.tokens()          # a generation sent with stream=True: each step's tokens as made
        job.cancel()

    `nnfabric.job(job_id)` reattaches from another process (then `result()` is the way in).
    Interrupting `wait()` (Ctrl-C, or a notebook's stop button) cancels the job on the fabric.
    """

    def __init__(
        self, fabric: FabricClient, job_id: str, request: JobRequest | None = None, model: str | None = None
    ) -> None:
        self.fabric = fabric
        self.id = job_id
        self.model = model
        self._request = request
        self._values: dict[str, Any] | None = None
        self._record: JobRecord | None = None  # the last record read, for a display
        self._state: str | None = None  # the last state known, for a repr that asks nothing

    # -- display -----------------------------------------------------------------------------
    def __repr__(self) -> str:
        """What is known without asking the fabric (a repr may run anywhere: a log, a traceback)."""
        parts = [f"<nnfabric.Job {self.id}"]
        if self.model:
            parts.append(f"model={self.model}")
        if self._state is not None:
            parts.append(f"state={self._state}")
        if self._state == "queued" and self._record is not None and self._record.get("position") is not None:
            parts.append(f"position={self._record.get('position')}")
        return " ".join(parts) + ">"

    def _fresh(self) -> JobRecord | None:
        """The job's state for a display: read again unless it has ended; None if unreadable."""
        if self._record is None or self._record["state"] not in TERMINAL or self._state != self._record["state"]:
            with contextlib.suppress(Exception):  # a display never raises: it shows what it last knew
                self.status()
        return self._record

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        self._fresh()
        printer.text(repr(self))

    def _repr_html_(self) -> str:
        record = self._fresh()
        rows = [("id", self.id), ("model", self.model or "?")]
        if record is None:
            rows.append(("state", "unknown (the fabric did not answer)"))
        else:
            rows.append(("state", record["state"]))
            if record.get("position") is not None:
                rows.append(("position", f"{record.get('position')} jobs ahead"))
            started, finished = record.get("started"), record.get("finished")
            if started is not None:
                rows.append(("waited", elapsed(started - record["created"])))
                rows.append(("ran", elapsed((finished or time.time()) - started)))
            if record.get("error"):
                rows.append(("error", str(record.get("error"))))
        return html_table("nnfabric job", rows)

    # -- state -------------------------------------------------------------------------------
    def status(self) -> JobRecord:
        record = self.fabric.status(self.id)
        self._record, self._state = record, record["state"]
        self.model = self.model or record.get("model")
        return record

    def cancel(self) -> CancelReply:
        return self.fabric.cancel(self.id)

    def wait(self, timeout: float | None = None, on_event: Callable[[dict[str, Any]], None] | None = None) -> Job:
        """Wait until the job ends; raise RemoteError (at your line) if it failed."""
        if self._values is not None:
            return self
        try:
            final = self.fabric.wait(self.id, timeout, self.model, on_event=on_event)
        except KeyboardInterrupt as interrupt:
            # The user stopped waiting: stop the job too, as they would expect of a local run.
            if self.fabric.cancel_quietly([self.id]):
                interrupt.add_note(f"nnfabric: job {self.id} was cancelled on the fabric")
            raise
        self._state = final["type"]
        if final["type"] != "completed":
            node, trace = final.get("node"), final.get("trace")
            message = final.get("message") or f"job {final['type']}"
            line = self._request.line(trace, node) if self._request else None
            raise RemoteError(f"{message} (job {self.id})", line, node, trace=trace)
        self.receive(self.fabric.result(self.id))
        return self

    def tokens(self, timeout: float | None = None) -> Iterator[list[int]]:
        """Each step's new token of each row, while the job generates (a generate job sent with
        `stream=True`), then the job's end as `wait()` has it (saved values delivered, or
        RemoteError). Only the job's own tokens: batch-mates' never reach it. A job that ran
        alone (`exact=True`, a model split into stages) streams none: read its output.

            with model.generate(prompt, max_new_tokens=20, remote=True, blocking=False, stream=True) as tracer:
                out = tracer.output.save()
            for step in tracer.job.tokens():
                print(model.tokenizer.decode(step[0]), end="", flush=True)
        """
        arrived: queue.Queue[Any] = queue.Queue()
        ended = object()
        steps = [0]

        def heard(event: dict[str, Any]) -> None:
            if event["type"] == "tokens" and event.get("step") == steps[0]:  # a job run again repeats none
                steps[0] += 1
                arrived.put(event["tokens"])

        def follow() -> None:
            try:
                self.wait(timeout, heard)
                arrived.put(ended)
            except BaseException as exc:  # handed to the caller's thread
                arrived.put(exc)

        threading.Thread(target=follow, name=f"nnfabric-tokens-{self.id}", daemon=True).start()
        try:
            while (item := arrived.get()) is not ended:
                if isinstance(item, BaseException):
                    raise item
                yield item
        except KeyboardInterrupt as interrupt:
            if self.fabric.cancel_quietly([self.id]):
                interrupt.add_note(f"nnfabric: job {self.id} was cancelled on the fabric")
            raise

    def receive(self, data: bytes) -> None:
        """The job's result envelope (however it came): the trace's saved proxies get their values."""
        from ..runtime.wire import split_saved, unpack_values

        self._values = unpack_values(data)
        if self._request is not None:
            self._request.deliver(split_saved(self._values, len(self._request.graphs)))

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
