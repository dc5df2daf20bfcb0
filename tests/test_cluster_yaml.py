"""The deployment files: cluster.yaml and cluster-gcp.yaml pass Ray's own validator (no cloud
credentials needed), start harvest safely, and the container image runs `harvest up`."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ["cluster.yaml", "cluster-gcp.yaml"]
CLUSTER_DIR = ROOT / "scripts" / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def ray_validated(config: dict) -> dict:
    """What `ray up` does to a config before it touches a cloud: defaults filled in, then the
    JSON schema shipped in the ray package."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", CLUSTERS)
def test_ray_accepts_the_cluster_config(name):
    prepared = ray_validated(load(name))
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["min_workers"] >= 1  # ray up ends serving


def test_ray_validator_rejects_a_broken_config():
    """The premise of the test above: the validator does refuse a bad file."""
    import jsonschema

    broken = load("cluster.yaml") | {"head_start_commands": ["typo of head_start_ray_commands"]}
    with pytest.raises(jsonschema.ValidationError):
        ray_validated(broken)


@pytest.mark.parametrize("name", CLUSTERS)
def test_the_head_installs_redis_and_starts_harvest(name):
    config = load(name)
    assert config["head_setup_commands"] == ["bash /tmp/harvest/scripts/cluster/head-setup.sh"]
    assert config["head_start_ray_commands"] == ["/usr/local/bin/harvest-head-start"]
    start = (CLUSTER_DIR / "head-start.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert start.rstrip().endswith('harvest" up --address auto --config /etc/harvest.yaml')
    setup = (CLUSTER_DIR / "head-setup.sh").read_text()
    assert "/usr/local/bin/harvest-head-start" in setup and "harvest-head.service" in setup
    unit = (CLUSTER_DIR / "harvest-head.service").read_text()
    assert "ExecStart=/usr/local/bin/harvest-head-start" in unit and "WantedBy=multi-user.target" in unit


def test_the_queue_redis_is_private_persistent_and_passworded():
    setup = (CLUSTER_DIR / "head-setup.sh").read_text()
    conf = setup.split("<<CONF\n", 1)[1].split("\nCONF\n", 1)[0].splitlines()
    assert "bind 127.0.0.1 $PRIVATE_IP" in conf and "protected-mode yes" in conf
    assert (
        "requirepass $PASSWORD" in conf and "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    )
    assert "0.0.0.0" not in setup and "protected-mode no" not in setup
    assert 'bash "$HERE/../install-redis.sh"' in setup  # >= 6.2, not the distribution's 6.0
    assert "umask 077" in setup and "openssl rand" in setup  # made on the head, 0600


def test_the_head_redis_settings_pass_harvests_checks(tmp_path, caplog):
    """The settings head-setup.sh gives the head's Redis, on a real redis-server (on loopback and
    a free port here): harvest connects with the password and finds nothing to warn about."""
    import logging

    from harvest.local_redis import free_port, wait_up
    from harvest.queue import redis_checks
    from harvest.queue.store import connect

    setup = (CLUSTER_DIR / "head-setup.sh").read_text()
    conf = setup.split("<<CONF\n", 1)[1].split("\nCONF\n", 1)[0]
    port, password = free_port(), "from-openssl-rand"
    conf = (
        conf.replace(" $PRIVATE_IP", "").replace("port 6379", f"port {port}").replace("$PASSWORD", password)
    )
    (tmp_path / "harvest.conf").write_text(conf + f'\ndir {tmp_path}\nsave ""\n')
    server = subprocess.Popen(["redis-server", str(tmp_path / "harvest.conf")], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        wait_up(url)
        caplog.set_level(logging.WARNING)
        redis_checks._passed.discard(url)
        assert connect(url).ping()
        assert [r for r in caplog.records if r.name == "harvest.queue"] == []
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("name", CLUSTERS)
def test_versions_are_pinned_and_the_wheel_is_this_version(name):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    install = next(c for c in load(name)["setup_commands"] if "pip install" in c and ".whl" in c)
    assert f"/tmp/harvest/dist/harvest-{version}-py3-none-any.whl" in install
    assert re.search(r'"torch==[\d.]+"', install) and re.search(r'"ray\[serve\]==[\d.]+"', install)
    for local in load(name)["file_mounts"].values():
        assert local in ("./dist", "./scripts")  # relative to the repository root, where ray up runs


@pytest.mark.parametrize("name", CLUSTERS)
def test_no_cluster_port_is_opened_to_the_world(name):
    text = (ROOT / name).read_text()
    assert "dashboard-host=0.0.0.0" not in text and "protected-mode no" not in text
    assert "security_group" not in load(name)["provider"]  # only as a commented example with a CIDR


def test_serve_env_for_ray_start_matches_the_service():
    from harvest.serve_env import SERVE_ENV

    exported = dict(
        re.match(r"export (\w+)=(.*)", line).groups()
        for line in (CLUSTER_DIR / "serve-env.sh").read_text().splitlines()
        if line.startswith("export ")
    )
    assert {key: value.strip('"') for key, value in exported.items()} == SERVE_ENV


def test_the_cluster_config_file_is_a_valid_harvest_config():
    from harvest.config import load_config

    config = load_config(CLUSTER_DIR / "harvest.yaml")
    assert config.host == "0.0.0.0" and config.api_key_file is not None and config.redis_url is None
    assert "/" in config.model  # a Hub id


@pytest.mark.parametrize(
    "script",
    ["scripts/install-redis.sh", "scripts/cluster/head-setup.sh", "scripts/cluster/head-start.sh",
     "scripts/docker/entrypoint.sh"],
)  # fmt: skip
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


# ---------------------------------------------------------------------- the container image


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_is_cuda_based_and_runs_harvest_up():
    text = dockerfile()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-runtime-ubuntu24\.04$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base$", text, re.M)
    cmd = re.search(r"^CMD (.+)$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1)) == [
        "harvest", "up", "--host", "0.0.0.0", "--config", "/etc/harvest.yaml"
    ]  # fmt: skip
    assert "redis-server --version" in text and '"torch==${TORCH_VERSION}"' in text
    for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (ROOT / source).exists(), source


def test_the_build_context_keeps_what_the_wheel_needs():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "harvest", "actors", "controller", "workloads", "scripts"):
        assert needed not in ignored
    assert ".git" in ignored and ".venv" in ignored


def test_the_entrypoint_keeps_the_container_up_and_runs_harvest_down_on_stop(tmp_path):
    """With a stand-in `harvest` that logs its calls: `up` runs, the entrypoint stays, and SIGTERM
    (docker stop) runs `harvest down` before it exits."""
    log = tmp_path / "calls"
    fake = tmp_path / "harvest"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    entry = str(ROOT / "scripts/docker/entrypoint.sh")
    proc = subprocess.Popen([entry, "harvest", "up", "--host", "0.0.0.0"], env=env)
    deadline = time.monotonic() + 10
    while not (log.exists() and "up" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert proc.poll() is None  # still running after `harvest up` returned
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert log.read_text().splitlines() == ["up --host 0.0.0.0", "down"]
    other = subprocess.run([entry, sys.executable, "-c", "print('as is')"], env=env, capture_output=True)
    assert other.stdout == b"as is\n"
