"""The embedded Redis that `harvest up` starts when HARVEST_REDIS_URL is not set.

Persistent (append-only file, fsync every second) under the data dir, on a fixed port bound
to 127.0.0.1, with a random password that its first start writes to the data dir (0600)
and every later start reuses: the CLI finds the URL there (queue.config.embedded_redis_url),
the workers get it from `harvest up`. The password goes to redis-server on stdin, never on
its command line, where any local user could read it from the process list.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from harvest.paths import data_dir, embedded_redis_password_file
from harvest.queue.config import EMBEDDED_REDIS_PORT, embedded_redis_url
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


def is_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def ensure_password() -> str:
    """The embedded Redis's password: read from the data dir, or made there (0600) once."""
    path = embedded_redis_password_file()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # two starts racing: the first one's stays
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def _protect_unguarded(port: int, password: str) -> None:
    """An embedded Redis that an older harvest started has no password (and redis-py's AUTH
    to it succeeds anyway): give it ours while it runs. Refuse a foreign open Redis."""
    client = redis.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5, decode_responses=True
    )
    try:
        folder = client.config_get("dir").get("dir")
    except redis.RedisError:  # nothing there, or it asks for a password: guarded
        return
    if folder is None or Path(folder).resolve() != redis_dir().resolve():
        raise RuntimeError(
            f"127.0.0.1:{port} is an open Redis (no password) that harvest did not start (its dir is "
            f"{folder}): stop it, or set HARVEST_REDIS_URL to use it"
        )
    client.config_set("requirepass", password)


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(port: int = EMBEDDED_REDIS_PORT, timeout_s: float = 10.0) -> str:
    """Start (or find running) the embedded redis-server; returns its URL (with the password)."""
    password = ensure_password()
    url = embedded_redis_url(port)
    _protect_unguarded(port, password)
    if is_up(url):
        return url
    if _port_taken(port):
        raise RuntimeError(
            f"127.0.0.1:{port} is taken by something that does not accept the embedded Redis's "
            "password: stop it, or set HARVEST_REDIS_URL"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: run scripts/install-redis.sh, or set HARVEST_REDIS_URL")
    folder = redis_dir()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the append-only file holds every job's prompts and results
    started = subprocess.run(
        [
            binary,
            "-",  # the rest of the config, the password, on stdin
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
        ],
        input=f"requirepass {password}\n".encode(),
        capture_output=True,
    )
    if started.returncode != 0:  # e.g. a bad --dir, or an option this redis-server lacks
        said = (started.stderr or started.stdout).decode(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"redis-server exited with {started.returncode}: {said[-1] if said else 'no message'}; "
            f"see {folder / 'redis.log'}"
        )
    try:
        wait_up(url, timeout_s)
    except TimeoutError:
        raise RuntimeError(
            f"redis-server did not come up on port {port}; see {folder / 'redis.log'}"
        ) from None
    return url


def stop(port: int = EMBEDDED_REDIS_PORT) -> bool:
    """Shut the embedded server down (its AOF flushed); False if it was not running."""
    url = embedded_redis_url(port)
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
        """Used memory (bytes), number of keys, of those how many never expire, and how many
        of those belong to no live job (`key_patterns`)."""
        used = int(redis.Redis.from_url(self.url).info("memory")["used_memory"])
        patterns = self.key_patterns().values()  # one scan counts them all
        return {
            "used_memory": used,
            "keys": sum(p["keys"] for p in patterns),
            "keys_without_ttl": sum(p["no_ttl"] for p in patterns),
            "stray_keys_without_ttl": sum(p["no_ttl"] - p["live_job"] for p in patterns),
        }

    def key_patterns(self, prefix: str = "harvest") -> dict[str, dict[str, int]]:
        """The keyspace by pattern (`key_pattern`): how many keys, how many never expire, and
        how many of those are a live job's own (`{prefix}:job:ID...` while the job's record
        has no TTL either: a job's keys get theirs when it finishes, so a running job's are
        in flight, not piling up)."""
        client = redis.Redis.from_url(self.url)
        keys = [k.decode(errors="replace") for k in client.scan_iter(count=1000)]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = pipe.execute()
        jobs = f"{prefix}:job:"

        def job_of(key: str) -> str | None:  # the record of the job a key belongs to
            return jobs + key[len(jobs) :].split(":")[0] if key.startswith(jobs) else None

        live = {key for key, ttl in zip(keys, ttls) if ttl == -1 and job_of(key) == key}
        patterns: dict[str, dict[str, int]] = {}
        for key, ttl in zip(keys, ttls):
            entry = patterns.setdefault(key_pattern(key), {"keys": 0, "no_ttl": 0, "live_job": 0})
            entry["keys"] += 1
            entry["no_ttl"] += ttl == -1
            entry["live_job"] += ttl == -1 and job_of(key) in live
        return dict(sorted(patterns.items()))


def key_pattern(key: str) -> str:
    """`key` with every segment that holds a digit (ids, shard numbers) as `*`: what a soak
    compares between its start and end to find a kind of key that piles up."""
    return ":".join("*" if any(c.isdigit() for c in part) else part for part in key.split(":"))


@contextlib.contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """A redis-server of our own on a free port, for as long as the context lasts."""
    server = RedisProcess(data_dir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
