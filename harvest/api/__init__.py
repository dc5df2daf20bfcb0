"""The OpenAI-compatible HTTP layer: `build_app(backend)`, independent of Ray."""

from harvest.api.app import build_app
from harvest.api.backend import Backend, BackendBusy, BackendUnavailable
from harvest.api.local import LocalBackend

__all__ = ["Backend", "BackendBusy", "BackendUnavailable", "LocalBackend", "build_app"]
