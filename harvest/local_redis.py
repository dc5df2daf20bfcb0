"""The embedded Redis that `harvest up` starts when HARVEST_REDIS_URL is not set.

Persistent (append-only file, fsync every second) under the data dir, on a fixed local
port so that the client, the CLI and the workers all find it without configuration.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from harvest.paths import data_dir
from harvest.queue.config import DEFAULT_REDIS_URL, EMBEDDED_REDIS_PORT
from harvest.redact import redact_url


def free_port() -> int:
    """A TCP port nothing listens on right now (tests and benches start servers on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout_s: float = 10.0) -> None:
    """Block until the Redis at `url` answers PING; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not is_up(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Redis answered at {redact_url(url)} within {timeout_s:.0f} s")
        time.sleep(0.02)


def redis_dir() -> Path:
    return data_dir() / "redis"


def is_up(url: str = DEFAULT_REDIS_URL) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start(port: int = EMBEDDED_REDIS_PORT, timeout_s: float = 10.0) -> str:
    """Start (or find running) the embedded redis-server; returns its URL."""
    url = f"redis://127.0.0.1:{port}/0"
    if is_up(url):
        return url
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run scripts/install-redis.sh, or set HARVEST_REDIS_URL")
    folder = redis_dir()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
        ],
        check=True,
    )
    try:
        wait_up(url, timeout_s)
    except TimeoutError:
        raise RuntimeError(
            f"redis-server did not come up on port {port}; see {folder / 'redis.log'}"
        ) from None
    return url


def stop(port: int = EMBEDDED_REDIS_PORT) -> bool:
    """Shut the embedded server down (saving its data); False if it was not running."""
    url = f"redis://127.0.0.1:{port}/0"
    if not is_up(url):
        return False
    with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it exits
        redis.Redis.from_url(url).shutdown(save=False)
    return True


class RedisProcess:
    """A redis-server child process of our own on a free port and data dir (tests and
    benchmarks never touch a shared one). It can be stopped, SIGKILLed and started again
    on the same port and data dir, as a supervisor would restart it.

    `appendfsync`: the append-only file's fsync policy, or None for no AOF at all.
    """

    def __init__(
        self, data_dir: Path, appendfsync: str | None = "everysec", password: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run scripts/install-redis.sh")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "no" if self.appendfsync is None else "yes"]  # fmt: skip
        if self.appendfsync is not None:
            args += ["--appendfsync", self.appendfsync]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(self.url, timeout_s=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write; a restart loads the append-only file."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def memory(self) -> dict[str, int]:
        """Used memory (bytes) and number of keys."""
        client = redis.Redis.from_url(self.url)
        return {"used_memory": int(client.info("memory")["used_memory"]), "keys": int(client.dbsize())}


@contextlib.contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """A redis-server of our own on a free port, for as long as the context lasts."""
    server = RedisProcess(data_dir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
