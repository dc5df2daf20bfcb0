"""The embedded Redis that `harvest up` starts when HARVEST_REDIS_URL is not set.

Persistent (append-only file, fsync every second) under the data dir, on a fixed local
port so that the client, the CLI and the workers all find it without configuration.
"""

from __future__ import annotations

import contextlib
import shutil
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


@contextlib.contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """A redis-server of our own on a free port (the bench never touches a shared one)."""
    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_up(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
