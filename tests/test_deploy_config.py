"""One config for `harvest up`, `harvest config show` and the Serve builder harvest.deploy:app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from harvest.cli import app
from harvest.cli.exits import EXIT_BAD_INPUT
from harvest.config import ConfigError, build_config, load_config, parse_kv_cache_memory
from harvest.service import service_config
from tests.helpers import serve_app
from tests.test_hub_models import add_to_hub_cache

SECRET_KEY = "sk-very-secret"
REDIS_PASSWORD = "hunter2-redis"


def write_config(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def one_line(output: str) -> str:  # rich wraps long lines to the terminal's width
    return output.replace("\n", "")


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"port": 70000}, "port"),
        ({"workers": 0}, "workers"),
        ({"dtype": "int4"}, "dtype"),
        ({"policy": "fastest"}, "policy"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
        ({"kv_cache_memory": 1.5}, "kv_cache_memory"),
        ({"job_ttl": "soon"}, "job_ttl"),
        ({"slo_ttft_ms": -5}, "slo_ttft_ms"),
        ({"modle": "org/name"}, "modle"),
        ({"queue": {"max_shards": 0}}, "queue.max_shards"),
        ({"queue": {"visibility": 5}}, "queue.visibility"),
        ({"queue": {"visibility_timeout_s": 3, "renew_interval_s": 4}}, "queue"),
    ],
)
def test_a_bad_key_in_the_file_is_named_with_the_file(tmp_path, keys, named):
    path = write_config(tmp_path / "harvest.yaml", **keys)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{named} in {path}:"), err.value


def test_a_file_that_is_not_a_mapping_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "harvest.yaml"
    path.write_text("- model\n- port\n")
    with pytest.raises(ConfigError, match=f"{path}: must be a mapping"):
        load_config(path)


def test_up_refuses_a_bad_file_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("HARVEST_HOME", str(tmp_path / "home"))
    path = write_config(tmp_path / "harvest.yaml", model="org/name", prot=8001)
    result = cli("up", "--config", str(path))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert f"prot in {path}: unknown key" in one_line(result.output)
    assert not (tmp_path / "home").exists()  # no embedded Redis, no demo model


def test_flags_override_the_file_and_a_bad_flag_is_not_blamed_on_the_file(tmp_path):
    path = write_config(tmp_path / "harvest.yaml", model="org/name", port=9000, workers=2, dtype="bfloat16")
    config = load_config(path, {"port": 9100, "dtype": None, "served_model_name": []})
    assert (config.model, config.port, config.workers, config.dtype) == ("org/name", 9100, 2, "bfloat16")
    with pytest.raises(ConfigError) as err:
        load_config(path, {"port": 0})
    assert str(err.value).startswith("--port:") and str(path) not in str(err.value)
    shown = yaml.safe_load(cli("config", "show", "--config", str(path), "--workers", "3").stdout)
    assert (shown["model"], shown["port"], shown["workers"]) == ("org/name", 9000, 3)


def test_config_show_masks_the_api_key_and_the_redis_password(tmp_path):
    path = write_config(tmp_path / "harvest.yaml", model="org/name",
                        redis_url=f"redis://harvest:{REDIS_PASSWORD}@10.0.0.5:6379/0")  # fmt: skip
    result = cli("config", "show", "--config", str(path), env={"HARVEST_API_KEY": SECRET_KEY})
    assert result.exit_code == 0, result.output
    assert SECRET_KEY not in result.output and REDIS_PASSWORD not in result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["api_key"] == "***" and shown["redis_url"] == "redis://***:***@10.0.0.5:6379/0"
    # the Redis harvest would use from the environment is shown, masked, too
    from_env = cli("config", "show", env={"HARVEST_REDIS_URL": f"redis://:{REDIS_PASSWORD}@db:6379"})
    assert REDIS_PASSWORD not in from_env.output
    assert yaml.safe_load(from_env.stdout)["redis_url"] == "redis://:***@db:6379"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        (4096, 4096),
        ("0.8", 0.8),
        (0.5, 0.5),
        ("1.0", 1.0),
    ],
)
def test_kv_cache_memory_is_bytes_or_a_fraction(value, expected):
    assert parse_kv_cache_memory(value) == expected


def test_the_config_reaches_the_engine_and_the_service(tmp_path, tiny_model):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET_KEY + "\n")
    config = build_config({
        "model": "org/name@v1", "kv_cache_memory": "1GiB", "max_model_len": 2048, "policy": "fcfs",
        "slo_ttft_ms": 250, "api_key_file": str(key_file), "job_ttl": "12h", "workers": 2,
        "queue": {"visibility_timeout_s": 5, "max_shards": 1},
    })  # fmt: skip
    settings = service_config(config, "/models/snapshot", "redis://localhost:6379")
    assert settings.engine_options == {
        "dtype": "auto", "policy": "fcfs", "kv_cache_bytes": 2**30, "max_model_len": 2048,
        "slo": {"ttft_s": 0.25, "tpot_s": 0.1},  # the controller reads both targets
    }  # fmt: skip
    assert settings.model_name == "org/name" and settings.model_aliases == []  # the Hub id, no revision
    assert (settings.api_key, settings.job_ttl_s, settings.num_workers) == (SECRET_KEY, 12 * 3600, 2)
    assert settings.queue_options == {"visibility_timeout_s": 5, "max_shards": 1}  # the rest: WorkerConfig's
    named = build_config({"model": "org/name", "served_model_name": ["a", "b"], "kv_cache_memory": 0.9})
    assert named.engine_options()["kv_cache_fraction"] == 0.9
    settings = service_config(named, "org/name", "redis://localhost:6379")
    assert (settings.model_name, settings.model_aliases) == ("a", ["b"])
    assert build_config({"model": str(tiny_model)}).model_names() == ["harvest"]  # a directory: as before


def test_serve_run_string_args_are_coerced_like_the_file():
    """`serve run harvest.deploy:app workers=2 ...` hands every value over as a string."""
    config = build_config({"model": "org/name", "workers": "2", "kv_cache_memory": "0.8",
                           "served_model_name": "chat", "slo_tpot_ms": "40", "port": "8001"})  # fmt: skip
    assert (config.workers, config.kv_cache_memory, config.served_model_name) == (2, 0.8, ["chat"])
    assert config.engine_options()["slo"] == {"ttft_s": 1.0, "tpot_s": 0.04}


def test_an_engine_built_from_the_config_options_has_what_was_asked(tiny_model):
    from harvest.engine import Engine
    from harvest.engine.model_runner import DTYPES, load_shape

    config = build_config({"model": str(tiny_model), "kv_cache_memory": "64KiB", "max_model_len": 96,
                           "policy": "priority-recompute", "slo_ttft_ms": 300})  # fmt: skip
    engine = Engine.from_pretrained(
        config.model, profile_latency=False, block_size=4, **config.engine_options()
    )
    block_bytes = load_shape(str(tiny_model)).block_bytes(4, DTYPES["float32"])
    assert engine.block_manager.num_blocks == 64 * 2**10 // block_bytes
    assert engine.max_model_len == 96 and engine.config.dtype == "float32"
    assert engine.policy.value == "priority-recompute" and engine.scheduler.config.slo.ttft_s == 0.3


def test_every_served_name_is_accepted(tiny_model):
    served = serve_app(tiny_model, ["first", "second"])
    try:
        with TestClient(served.app) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["first", "second"]
            body = {"prompt": "The miller", "max_tokens": 2}
            assert client.post("/v1/completions", json={**body, "model": "second"}).status_code == 200
            assert client.post("/v1/completions", json={**body, "model": "third"}).status_code == 404
    finally:
        served.loop.stop()


def test_up_refuses_an_absent_hub_model_offline_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("HARVEST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("up", "--model", "tiny-org/absent")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "--model" in result.output and str(tmp_path / "hub" / "models--tiny-org--absent") in one_line(
        result.output
    )
    assert not (tmp_path / "home").exists()


def test_the_serve_builder_refuses_bad_args_naming_the_key(monkeypatch):
    from harvest.deploy import app as build

    monkeypatch.delenv("HARVEST_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match=r"^workerz in the Serve application's args: unknown key"):
        build({"model": "org/name", "workerz": 2})
    with pytest.raises(ConfigError, match=r"^redis_url: required"):
        build({"model": "org/name"})


def test_the_serve_builder_starts_the_controller_and_returns_the_workers_app(
    ray_cluster, redis_server, tiny_model, tmp_path, monkeypatch
):
    """What `serve run harvest.deploy:app model=ORG/NAME redis_url=...` calls, on the tests' Ray."""
    import ray
    from ray.serve import Application

    from harvest.deploy import app as build
    from harvest.names import CONTROLLER_NAME, NAMESPACE

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model)
    built = build({"model": "tiny-org/tiny-llama", "redis_url": redis_server.url, "workers": 1,
                   "slo_ttft_ms": 500, "api_key": SECRET_KEY})  # fmt: skip
    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    try:
        assert isinstance(built, Application)
        status = ray.get(controller.status.remote(), timeout=30)
        config = status["config"]
        assert config["model"] == "tiny-org/tiny-llama" and config["model_name"] == "tiny-org/tiny-llama"
        assert config["engine_options"]["slo"] == {"ttft_s": 0.5, "tpot_s": 0.1}
        assert config["api_key"] == "***" and config["num_workers"] == 1
    finally:
        ray.kill(controller, no_restart=True)


def test_every_config_in_the_deploy_guide_is_valid():
    import re

    text = (Path(__file__).parents[1] / "docs" / "DEPLOY.md").read_text()
    configs = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        data = yaml.safe_load(block)
        if "spec" in data:  # a RayService: its serveConfigV2 is Serve's config, as a string
            data = yaml.safe_load(data["spec"]["serveConfigV2"])
        apps = data.get("applications")
        configs += [a["args"] for a in apps if a["import_path"] == "harvest.deploy:app"] if apps else [data]
    assert len(configs) == 3
    for args in configs:
        build_config(args)  # raises ConfigError naming the key
