"""What every benchmark suite shares: machine info, the git commit, JSON + table output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harvest.local_redis import free_port  # noqa: F401  (re-exported for the suites)

console = Console()


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None):
    """Ray for a benchmark: a local instance, unless this process is already connected."""
    import ray

    from harvest.names import NAMESPACE
    from harvest.serve_env import use_serve_env

    owned = not ray.is_initialized()
    if owned:
        use_serve_env(private_ports=True)
        ray.init(
            # "local": a new instance even where another `ray start` runs on this machine
            # (a bare init() would join it, and be cancelled when it stops)
            address="local",
            namespace=NAMESPACE,
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="error",
        )
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(out: Path, suite: str, result: dict[str, Any]) -> Path:
    """Write OUT/SUITE.json with machine info, commit and time stamped in."""
    result = {
        "suite": suite,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "machine": machine_info(),
        **result,
    }
    path = Path(out) / f"{suite}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {path}")
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
