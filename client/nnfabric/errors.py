"""Exceptions a researcher sees. Each carries the user's own line where one is known."""

from __future__ import annotations

from .graph.ir import SourceLine
from .graph.validate import GraphError


class InterventionError(Exception):
    """Running the graph failed at one of the user's lines.

    The message names the line and the cause; locally the traceback ends at that line and
    `__cause__` is the original exception.
    """

    def __init__(
        self, message: str, line: SourceLine | None = None, node: int | None = None, trace: int | None = None
    ) -> None:
        self.reason = message
        self.line = line
        self.node = node
        self.trace = trace  # which trace of a session failed, when the job is one
        text = message if line is None else f"{message}\n  at {line.describe()}"
        super().__init__(text)


class RemoteError(InterventionError):
    """The fabric rejected or failed a job; carries the server's message and the user's line."""

    def __init__(
        self,
        message: str,
        line: SourceLine | None = None,
        node: int | None = None,
        status: int | None = None,
        trace: int | None = None,
    ) -> None:
        super().__init__(message, line, node, trace)
        self.status = status


__all__ = ["GraphError", "InterventionError", "RemoteError"]
