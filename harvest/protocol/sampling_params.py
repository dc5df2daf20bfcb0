"""SamplingParams: how one request samples, in plain data below every layer.

It lives here, free of torch, so that the queue, the client and the HTTP layer can build
and check it without importing the engine; `harvest.engine.sampling` re-exports it.
The checks in `__post_init__` are the engine's last line: a value that passes them
cannot make a step raise. User-facing bounds (and their messages) are in `requests.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this, logits / temperature overflows float32 (logits of ~40 / 1e-40 is inf) and
# softmax turns inf - inf into NaN: the sampler raises and takes the whole step down.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKEN_ID = 2**63 - 1  # ids are int64 tensors; the vocabulary check comes with the model
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        in_range = _is_number(t) and math.isfinite(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)
        if not in_range:
            raise ValueError(f"temperature must be 0 or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer within int64, got {self.seed!r}")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or any(
            not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID for t in self.stop_token_ids
        ):
            raise ValueError("stop_token_ids must be a list of token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
