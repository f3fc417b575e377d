"""Large results on disk instead of in Redis: the replica writes them, the api streams them.

Usage::

    results = ResultStore(settings.result_store_dir)
    name = results.write(job_id, data)         # atomically: a reader never sees half a file
    path = results.path(name)                  # what the api streams (with Range support)
    results.sweep(ttl_s)                       # files of jobs past their TTL are deleted

In a cluster the directory is a volume shared by the replicas and the api (the chart's model
cache volume). Redis then holds only the file's name, so its memory stays flat however large
the saved values are. The name is made from the job id (hex); nothing from a request is ever
used as a path.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

_NAME = re.compile(r"^[0-9a-f]{32}\.nnfr$")


class ResultStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def write(self, job_id: str, data: bytes) -> str:
        name = f"{job_id}.nnfr"
        if not _NAME.match(name):
            raise ValueError(f"not a job id: {job_id[:40]!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{name}.{os.getpid()}.part"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, self.directory / name)
        return name

    def path(self, name: str) -> Path | None:
        """The file of a stored result, or None if the name is not one or the file is gone."""
        if not _NAME.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def delete(self, name: str) -> None:
        path = self.path(name)
        if path is not None:
            path.unlink(missing_ok=True)

    def sweep(self, ttl_s: float) -> int:
        """Delete results (and abandoned partial files) older than `ttl_s`; how many went."""
        if not self.directory.is_dir():
            return 0
        cutoff = time.time() - ttl_s
        gone = 0
        for path in self.directory.iterdir():
            if (_NAME.match(path.name) or path.name.endswith(".part")) and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                gone += 1
        return gone
