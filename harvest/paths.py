"""Where harvest keeps its local state (models, embedded Redis data)."""

import os
from pathlib import Path


def data_dir() -> Path:
    """$HARVEST_HOME, else $XDG_DATA_HOME/harvest, else ~/.local/share/harvest."""
    if home := os.environ.get("HARVEST_HOME"):
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "harvest"


def default_model_dir() -> Path:
    return data_dir() / "models" / "tiny-llama"


def ensure_default_model(train_seconds: float = 60.0) -> Path:
    """The demo model: a tiny llama trained briefly on the bundled corpus, built once."""
    path = default_model_dir()
    if not (path / "config.json").exists():
        from harvest.models.tiny import make_tiny

        make_tiny(path, "llama", hidden=128, layers=4, train_seconds=train_seconds)
    return path


def embedded_redis_password_file() -> Path:
    """The embedded Redis's password (mode 0600), made by its first start and reused after."""
    return data_dir() / "redis" / "password"


def ray_started_marker() -> Path:
    """Written by `harvest up` when it starts the local Ray head (it holds that Ray's session),
    so that `harvest down` stops only a Ray that `up` started."""
    return data_dir() / "ray-started-by-harvest"
