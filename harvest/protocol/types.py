"""What the engine says about a request, in plain data below every layer.

Request classes, finish reasons, step outputs and the exported state a request continues
from on another engine. Torch-free, like `sampling_params.py`, so that the queue, the
client and the HTTP layer read them without importing the engine; `harvest.engine`
re-exports them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from harvest.checkpoint.handle import CheckpointHandle


class RequestClass(str, enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


# Order within a request class, lower first (vLLM's convention); requests run at 0. A flex
# request (the offline class over HTTP) has somebody waiting on its answer, a batch line has
# a window of hours: flex goes ahead of batch lines, and batch lines are preempted first.
FLEX_PRIORITY = -1


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"  # the request's own step failed (see engine/fault.py); `RequestOutput.error` says how


@dataclass
class RequestOutput:
    """What one step produced for one request, or (`finished`) the whole completion.

    `token_ids` and `text` are cumulative; `new_token_ids` and `delta_text` are this step's
    part. Mid-stream `text` is filled only for requests that stream text.
    """

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    text: str = ""
    delta_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    device_seconds: float = 0.0  # of the finished output: the engine's step time spent on it
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why a request finished with `FinishReason.ERROR`
    request_class: RequestClass = RequestClass.OFFLINE
    checkpoint: CheckpointHandle | None = None  # where an unfinished request can resume from


@dataclass
class RequestState:
    """Everything needed to continue a request on another engine: tokens so far, sampling
    parameters and seed, and the KV checkpoint it can resume from."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: dict[str, Any]
    request_class: str
    arrival_time: float
    checkpoint: CheckpointHandle | None = None
    num_preemptions: int = 0
    seed: int | None = None  # a request without its own seed keeps the random one it drew
    device_seconds: float = 0.0  # spent on it so far: a resumed request keeps counting
    priority: int = 0
