"""A redis-server child process for the benchmarks that can be SIGKILLed and restarted."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis as redis_py

from harvest.local_redis import free_port, wait_up


class RedisProcess:
    """A redis-server with an append-only file that can be SIGKILLed and started again
    on the same port and data dir (what a supervisor such as systemd would do)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(self.url, timeout_s=30)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def memory(self) -> dict[str, int]:
        """Used memory (bytes) and number of keys."""
        client = redis_py.Redis.from_url(self.url)
        return {"used_memory": int(client.info("memory")["used_memory"]), "keys": int(client.dbsize())}
