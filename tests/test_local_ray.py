"""Local starts stay local: `harvest down` stops only a Ray that `harvest up` started, and
`harvest up` on a public interface without an API key says so loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from harvest import local_ray
from harvest.cli import app
from harvest.cli.exits import EXIT_BAD_INPUT
from harvest.paths import ray_started_marker


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HARVEST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_ray_sessions(root: Path, latest: str) -> Path:
    """A Ray temp dir as `ray start` leaves it: session dirs and `session_latest` -> the newest."""
    (root / latest).mkdir(parents=True, exist_ok=True)
    link = root / "session_latest"
    link.unlink(missing_ok=True)
    link.symlink_to(root / latest)
    return root


def record_started(session: str) -> None:
    ray_started_marker().parent.mkdir(parents=True, exist_ok=True)
    ray_started_marker().write_text(session)


def test_down_leaves_a_ray_it_did_not_start_running(ray_cluster, data_dir):
    """The tests' own Ray (ray.init, as a `ray start` cluster would be) has no marker: it stays."""
    assert local_ray.session() is not None
    assert local_ray.stop() is False
    assert ray_cluster.cluster_resources()["CPU"] >= 1  # still answering
    record_started("session_2020-01-01_00-00-00_000000_1")  # an earlier `up`'s Ray, since stopped
    assert local_ray.stop() is False
    assert not ray_started_marker().exists()  # the stale marker is gone
    assert ray_cluster.cluster_resources()["CPU"] >= 1


def test_down_stops_the_ray_that_up_started_and_only_that_session(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(local_ray, "RAY_TMP", fake_ray_sessions(tmp_path / "ray", "session_a"))
    assert local_ray.session() == "session_a"
    assert not local_ray.started_here("session_a")  # no marker: not ours
    record_started("session_a")
    assert local_ray.started_here(local_ray.session())
    fake_ray_sessions(tmp_path / "ray", "session_b")  # someone started another Ray since
    assert not local_ray.started_here(local_ray.session())


def test_up_on_a_public_interface_without_an_api_key_warns_before_anything_starts(tmp_path, data_dir):
    result = CliRunner().invoke(app, ["up", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")])
    assert result.exit_code == EXIT_BAD_INPUT  # the bad model stops it before anything starts
    assert "WARNING: listening on 0.0.0.0 with no API key" in result.output.replace("\n", "")
    key_file = tmp_path / "key"
    key_file.write_text("sk-test")
    with_key = CliRunner().invoke(app, ["up", "--host", "0.0.0.0", "--api-key-file", str(key_file),
                                        "--model", str(tmp_path / "missing")])  # fmt: skip
    assert with_key.exit_code == EXIT_BAD_INPUT and "WARNING" not in with_key.output
    assert not data_dir.exists()
