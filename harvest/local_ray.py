"""The local Ray head that `harvest up` starts when no `--address` is given, and whether
`harvest down` may stop it.

`ray stop` stops every Ray on the machine, so `up` records the session of the head it
started in the data dir, and `down` stops Ray only while that session is the latest.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from harvest.paths import ray_started_marker

LOCAL_RAY_PORT = 6385  # not Ray's default 6379, which a local Redis usually holds
RAY_TMP = Path("/tmp/ray")  # where `ray start` keeps its sessions


def start(num_cpus: int | None = None) -> bool:
    """A local Ray head that outlives this process; no-op if one runs.

    True if it was started here: then its session is recorded in the data dir and
    `harvest down` stops it; a Ray that was running already (`ray start`, a cluster) is left."""
    if shutil.which("ray") is None:
        raise RuntimeError("the `ray` command is missing: install harvest's dependencies")
    if subprocess.run(["ray", "status"], capture_output=True).returncode == 0:
        return False
    cmd = [
        "ray",
        "start",
        "--head",
        "--port",
        str(LOCAL_RAY_PORT),
        "--disable-usage-stats",
        "--dashboard-host",
        "127.0.0.1",  # the dashboard runs arbitrary jobs: loopback only
    ]
    # No `--node-ip-address 127.0.0.1`: Ray 2.60 replaces a loopback node address with the
    # machine's reachable IP (services.resolve_ip_for_localhost), and with it given, the GCS,
    # raylet and dashboard agent still listened on every interface (`ss -ltnp`). What guards
    # those ports is Ray's token authentication, which `ray start` 2.60 turns on by default.
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    import torch  # what the workers of this head will compute on decides the Ray tuning

    from harvest.serve_env import use_serve_env

    use_serve_env(device="cuda" if torch.cuda.is_available() else "cpu")
    subprocess.run(cmd, check=True, capture_output=True)
    marker = ray_started_marker()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(session() or "")
    return True


def session() -> str | None:
    """The latest Ray session on this machine (its directory under /tmp/ray), None if none."""
    latest = RAY_TMP / "session_latest"
    return latest.resolve().name if latest.is_symlink() else None


def started_here(session: str | None) -> bool:
    """Whether `harvest up` started the Ray whose session is `session` (and so `down` stops it).
    A marker left from an earlier Ray (stopped by hand, another one started since) says no."""
    marker = ray_started_marker()
    return marker.is_file() and session is not None and marker.read_text().strip() == session


def stop() -> bool:
    """`ray stop` (which stops every Ray on the machine) only if `harvest up` started the Ray
    running here; True if it did. A stale marker is dropped either way."""
    started = started_here(session())
    if started:
        subprocess.run(["ray", "stop"], capture_output=True)
    ray_started_marker().unlink(missing_ok=True)
    return started
