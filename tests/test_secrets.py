"""No secret is printed or stored in clear: Redis passwords in URLs, the API key."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from harvest.cli import app
from harvest.cli.exits import EXIT_REDIS
from harvest.client import HarvestClient
from harvest.local_redis import RedisProcess, free_port, wait_up
from harvest.queue.errors import RedisUnavailableError
from harvest.redact import redact_url

PASSWORD = "hunter2-s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
        (f"redis://:{PASSWORD}@host:6379/0", "redis://:***@host:6379/0"),
        (f"redis://alice:{PASSWORD}@host:6379/2", "redis://***:***@host:6379/2"),
        (
            f"rediss://alice:{PASSWORD}@host/0?ssl_cert_reqs=none",
            "rediss://***:***@host/0?ssl_cert_reqs=none",
        ),
        (f"redis://host:6379/0?password={PASSWORD}&db=1", "redis://host:6379/0?password=***&db=1"),
        (f"unix://:{PASSWORD}@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        (f"redis://:{PASSWORD}@[::1:6379/0", "redis://***@[::1:6379/0"),  # unparseable: still masked
    ],
)
def test_redact_url_masks_userinfo_and_password_options(url, shown):
    assert redact_url(url) == shown


@pytest.fixture
def password_redis(tmp_path) -> Iterator[str]:
    """A redis-server that wants PASSWORD; yields its URL (with the password)."""
    server = RedisProcess(tmp_path, appendfsync=None, password=PASSWORD)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def closed_url() -> str:
    return f"redis://alice:{PASSWORD}@127.0.0.1:{free_port()}/0"


def test_unreachable_redis_errors_never_show_the_password(password_redis, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = password_redis.replace(PASSWORD, PASSWORD + "-wrong")
    for url in (closed_url(), wrong):
        with pytest.raises(RedisUnavailableError) as info:
            HarvestClient(url)
        shown = f"{info.value} {info.value!r} {info.value.url}"
        assert PASSWORD not in shown and "***@127.0.0.1" in shown
    with pytest.raises(TimeoutError) as timeout:
        wait_up(closed_url(), timeout_s=0.05)
    assert PASSWORD not in str(timeout.value)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    "command",
    [["jobs"], ["status", "batch_x"], ["cancel", "batch_x"], ["submit", "FILE"], ["work", "--local"]],
)
def test_cli_never_prints_the_password(tmp_path, command, caplog):
    caplog.set_level(logging.DEBUG)
    (tmp_path / "in.jsonl").write_text(
        '{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "p"}}\n'
    )
    args = [str(tmp_path / "in.jsonl") if a == "FILE" else a for a in command]
    result = CliRunner().invoke(app, [*args, "--redis-url", closed_url()])
    assert result.exit_code == EXIT_REDIS, result.output
    assert "cannot reach Redis at redis://***:***@127.0.0.1" in result.stderr
    assert PASSWORD not in result.output and PASSWORD not in caplog.text


def test_redis_dying_mid_submit_shows_no_password(password_redis, monkeypatch, caplog):
    """The error that stops a submission, and the warning that the sweep will clean up after it."""
    caplog.set_level(logging.DEBUG)
    client = HarvestClient(password_redis)
    add_shards = client.store.add_shards

    def dying(job_id: str, shards: list, first: int) -> str:
        if first > 0:  # the second write: Redis goes away under it
            client.store.r.shutdown(nosave=True)
        return add_shards(job_id, shards, first=first)

    monkeypatch.setattr(client.store, "add_shards", dying)
    with pytest.raises(RedisUnavailableError) as info:
        client.submit([f"prompt {i}" for i in range(40)], shard_size=1)
    assert "***@127.0.0.1" in str(info.value) and PASSWORD not in str(info.value)
    assert "a sweep will fail it" in caplog.text and PASSWORD not in caplog.text


def test_service_config_repr_hides_secrets():
    from harvest.service import ServiceConfig

    config = ServiceConfig(model="m", redis_url=closed_url(), api_key="sk-" + PASSWORD)
    assert PASSWORD not in repr(config)


def test_controller_keeps_the_api_key_and_redis_password_out_of_redis_and_status(password_redis):
    """The controller class itself (Ray plays no part in what it stores or shows)."""
    from controller.config_store import CONFIG_KEY
    from controller.controller import HarvestController

    api_key = "sk-" + PASSWORD
    args = {"redis_url": password_redis, "api_key": api_key, "num_workers": 1, "monitor_period_s": 0.05}
    controller = HarvestController(dict(args))
    try:
        assert controller.set_slo(0.5, 0.05)  # no worker to wait for; a change that must survive a restart
        stored = controller.config_store.client.get(CONFIG_KEY)
        assert PASSWORD not in stored and "api_key" not in stored and "redis_url" not in stored
        shown = controller.status()["config"]
        assert PASSWORD not in str(shown)
        assert shown["api_key"] == "***" and shown["redis_url"].startswith("redis://:***@127.0.0.1")
    finally:
        controller.shutdown()
    controller.config_store.client.set(CONFIG_KEY, stored)  # as a crashed controller would have left it
    restarted = HarvestController(dict(args))
    try:
        assert restarted.config["engine_options"]["slo"] == {"ttft_s": 0.5, "tpot_s": 0.05}
        assert restarted.config["api_key"] == api_key  # from its arguments, for its own use
        assert PASSWORD not in restarted.config_store.client.get(CONFIG_KEY)
    finally:
        restarted.shutdown()


def test_the_config_store_keeps_no_secret_and_forgets_on_clear(redis_server):
    from controller.config_store import CONFIG_KEY, ConfigStore
    from harvest.queue.store import connect

    client = connect(redis_server.url)
    store = ConfigStore(client)
    assert store.get() == {}
    store.put({"model": "m", "api_key": "sk-" + PASSWORD, "redis_url": redis_server.url, "port": 8000})
    assert store.get() == {"model": "m", "port": 8000}
    assert PASSWORD not in client.get(CONFIG_KEY) and "redis_url" not in client.get(CONFIG_KEY)
    client.set(CONFIG_KEY, '{"model": "m", "api_key": "old"}')  # written by an older version
    assert store.get() == {"model": "m"}
    store.clear()
    assert store.get() == {} and client.get(CONFIG_KEY) is None
