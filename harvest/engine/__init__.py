"""harvest's inference engine: paged KV cache, continuous batching, HF models."""

from harvest.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from harvest.engine.engine import Engine
from harvest.engine.request import (
    FinishReason,
    Request,
    RequestClass,
    RequestOutput,
    RequestState,
    RequestStatus,
)
from harvest.engine.sampling import SamplingParams

__all__ = [
    "CacheConfig",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "Request",
    "RequestClass",
    "RequestOutput",
    "RequestState",
    "RequestStatus",
    "SamplingParams",
    "SchedulerConfig",
]
