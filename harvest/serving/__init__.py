"""Hosting an engine: the background step loop and its metrics, with no Ray and no HTTP."""

from harvest.serving.device_profile import DeviceProfile
from harvest.serving.engine_loop import EngineLoop, EngineLoopError
from harvest.serving.heap import freeze_heap
from harvest.serving.metrics import PROMETHEUS_CONTENT_TYPE, render_engine_metrics

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "DeviceProfile",
    "EngineLoop",
    "EngineLoopError",
    "freeze_heap",
    "render_engine_metrics",
]
