"""The queue refuses a Redis that would lose or never run jobs, and warns of lesser risks."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harvest.local_redis import free_port, wait_up
from harvest.queue import redis_checks
from harvest.queue.redis_checks import RedisConfigError, ServerFacts, check_server, problems
from harvest.queue.store import JobStore, connect

PASSWORD = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Every test sees its server checked, not a verdict cached by an earlier one."""
    monkeypatch.setattr(redis_checks, "_passed", set())
    monkeypatch.delenv(redis_checks.ALLOW_NO_AOF_ENV, raising=False)


def queue_warnings(caplog) -> list[str]:
    records = [r for r in caplog.records if r.name == "harvest.queue"]
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


class FakeInfo:
    """A client whose INFO answers what a test says (a server version we cannot start here)."""

    def __init__(self, info: dict) -> None:
        self._info = info

    def info(self) -> dict:
        return self._info


def info(version: str = "7.2.4", aof: int = 1, policy: str = "noeviction", maxmemory: int = 0) -> dict:
    return {"redis_version": version, "aof_enabled": aof, "maxmemory_policy": policy, "maxmemory": maxmemory}


def test_an_old_server_is_refused_naming_the_version_and_the_fix():
    url = f"redis://:{PASSWORD}@old-host:6379/0"
    with pytest.raises(RedisConfigError) as refused:
        check_server(FakeInfo(info(version="6.0.16")), url)
    message = str(refused.value)
    assert "6.0.16 < 6.2" in message and "LMOVE" in message and "install-redis.sh" in message
    assert PASSWORD not in message and "old-host" in message


@pytest.mark.parametrize(("version", "ok"), [("6.2.0", True), ("6.2.14", True), ("7.0.0-rc1", True),
                                             ("6.0.20", False), ("5.0.7", False)])  # fmt: skip
def test_version_boundary(version, ok):
    fatal, _ = problems(ServerFacts(version, aof_enabled=True, maxmemory_policy="noeviction", maxmemory=0))
    assert (not fatal) is ok


def test_the_test_server_passes_silently(redis_server, caplog):
    caplog.set_level(logging.WARNING)
    store = JobStore.from_url(redis_server.url)
    assert store.r.ping()
    assert queue_warnings(caplog) == []


def test_aof_off_warns_once_and_the_flag_silences_it(redis_server, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    redis.Redis.from_url(redis_server.url).config_set("appendonly", "no")
    connect(redis_server.url)
    connect(redis_server.url)  # checked once per process and server
    warned = queue_warnings(caplog)
    assert len(warned) == 1 and "appendonly yes" in warned[0] and "CONFIG SET" in warned[0]
    caplog.clear()
    monkeypatch.setattr(redis_checks, "_passed", set())
    monkeypatch.setenv(redis_checks.ALLOW_NO_AOF_ENV, "1")
    connect(redis_server.url)
    assert queue_warnings(caplog) == []


def test_an_evicting_cache_redis_is_refused(redis_server):
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", "100mb")
    with pytest.raises(RedisConfigError) as refused:
        connect(redis_server.url)
    assert "maxmemory-policy is allkeys-lru" in str(refused.value)
    assert "CONFIG SET maxmemory-policy noeviction" in str(refused.value)
    admin.config_set("maxmemory-policy", "noeviction")
    assert connect(redis_server.url).ping()  # a refusal is not cached: fixed, it connects


def test_an_evicting_policy_without_a_limit_only_warns(redis_server, caplog):
    caplog.set_level(logging.WARNING)
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", "volatile-lru")
    connect(redis_server.url)
    assert any("volatile-lru" in w for w in queue_warnings(caplog))


def test_an_acl_user_without_info_or_config_is_checked_through_hello(redis_server, caplog):
    caplog.set_level(logging.WARNING)
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("app", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
                      commands=["+@all", "-@dangerous"])  # fmt: skip
    url = f"redis://app:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(redis.ResponseError):
        redis.Redis.from_url(url).info()  # the premise: this user may not read INFO
    store = JobStore.from_url(url)
    store.set_job_ttl(60)  # the queue's own commands are allowed to an ACL user
    warned = queue_warnings(caplog)
    assert len(warned) == 1 and "could not read the eviction policy" in warned[0]
    assert PASSWORD not in caplog.text


# ---------------------------------------------------------------------- TLS (rediss://)


def tls_files(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (server cert and its own CA) and its key."""
    cert, key = folder / "redis.crt", folder / "redis.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_redis(tmp_path) -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("openssl and redis-server are needed for a TLS Redis")
    cert, key = tls_files(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        try:
            wait_up(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}", timeout_s=10)
        except TimeoutError:
            proc.kill()
            pytest.skip(f"this redis-server has no TLS: {proc.communicate()[1].decode()[-300:]}")
        yield port, cert
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rediss_url_with_password_reaches_a_tls_redis(tls_redis):
    port, cert = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    store = JobStore.from_url(url)
    store.set_job_ttl(120)
    assert store.r.connection_pool.connection_class is redis.SSLConnection
    assert store.r.ping()
    with pytest.raises(redis.ConnectionError):  # plain text to a TLS port is not answered
        redis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", socket_timeout=2).ping()


# ---------------------------------------------------------------------- the embedded Redis


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Iterator[int]:
    """The embedded Redis's home in tmp_path, on a free port (not 6390: other runs may hold it)."""
    from harvest import local_redis

    monkeypatch.setenv("HARVEST_HOME", str(tmp_path))
    monkeypatch.delenv("HARVEST_REDIS_URL", raising=False)
    port = free_port()
    yield port
    local_redis.stop(port)


def test_the_embedded_redis_has_a_private_password_reused_on_restart(embedded, tmp_path, caplog):
    from harvest import local_redis
    from harvest.paths import embedded_redis_password_file
    from harvest.queue.config import default_redis_url, embedded_redis_url

    caplog.set_level(logging.WARNING)
    url = local_redis.start(embedded)
    password_file = embedded_redis_password_file()
    password = password_file.read_text().strip()
    assert len(password) >= 32 and password_file.stat().st_mode & 0o777 == 0o600
    assert password_file.parent.stat().st_mode & 0o777 == 0o700  # its AOF: every job's prompts
    assert url == embedded_redis_url(embedded) == f"redis://:{password}@127.0.0.1:{embedded}/0"
    assert default_redis_url().startswith(f"redis://:{password}@127.0.0.1:")  # what the CLI connects to
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://127.0.0.1:{embedded}/0").set("k", "v")
    pid = int((tmp_path / "redis" / "redis.pid").read_text())
    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    store = JobStore.from_url(url)  # passes the checks: AOF on, noeviction
    assert store.r.config_get("bind")["bind"] == "127.0.0.1"
    assert queue_warnings(caplog) == []
    store.r.set("kept", "1")
    assert local_redis.stop(embedded)
    assert not local_redis.is_up(url)
    assert local_redis.start(embedded) == url  # same password, same data
    assert redis.Redis.from_url(url).get("kept") == b"1"


def test_a_redis_server_that_will_not_start_is_a_clear_error(embedded, tmp_path, monkeypatch):
    """redis-server refusing its options (an old build, a bad directory) is reported with its
    own last words, not a CalledProcessError traceback."""
    from harvest import local_redis

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "redis-server"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR: Bad directive' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="exited with 1: \\*\\*\\* FATAL CONFIG FILE ERROR: Bad directive"):
        local_redis.start(embedded)


@pytest.mark.parametrize("ours", [True, False])
def test_an_open_redis_on_the_port_is_protected_if_ours_else_refused(embedded, tmp_path, ours):
    """An embedded Redis from an older harvest had no password: `up` gives it one while it runs."""
    from harvest import local_redis

    folder = tmp_path / "redis" if ours else tmp_path / "elsewhere"
    folder.mkdir()
    old = subprocess.Popen(["redis-server", "--port", str(embedded), "--bind", "127.0.0.1", "--save", "",
                            "--dir", str(folder)], stdout=subprocess.DEVNULL)  # fmt: skip
    open_url = f"redis://127.0.0.1:{embedded}/0"
    try:
        wait_up(open_url)
        if not ours:
            with pytest.raises(RuntimeError, match="harvest did not start"):
                local_redis.start(embedded)
            assert redis.Redis.from_url(open_url).ping()  # left alone
            return
        url = local_redis.start(embedded)
        assert url != open_url and redis.Redis.from_url(url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(open_url).set("k", "v")
    finally:
        old.terminate()
        old.wait(timeout=10)


def test_the_cli_names_the_unfit_setting_and_exits_5(redis_server):
    from typer.testing import CliRunner

    from harvest.cli import app
    from harvest.cli.jobs import EXIT_REDIS

    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", "100mb")
    result = CliRunner().invoke(app, ["jobs", "--redis-url", redis_server.url])
    assert result.exit_code == EXIT_REDIS
    assert "maxmemory-policy is allkeys-lru" in result.output


def test_harvest_up_refuses_an_unfit_redis_before_starting_anything(redis_server, monkeypatch):
    from typer.testing import CliRunner

    from harvest.cli import app
    from harvest.cli.jobs import EXIT_REDIS

    redis.Redis.from_url(redis_server.url).config_set("maxmemory", "100mb")
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", "volatile-lru")
    monkeypatch.setenv("HARVEST_REDIS_URL", redis_server.url)
    result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == EXIT_REDIS
    assert "maxmemory-policy is volatile-lru" in result.output and "harvest is up" not in result.output
