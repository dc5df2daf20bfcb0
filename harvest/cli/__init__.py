"""The `harvest` command. Each module registers its own commands on `app`."""

from harvest.cli import bench, demo, jobs, model, service  # noqa: F401  (registration by import)
from harvest.cli.app import app

__all__ = ["app"]
