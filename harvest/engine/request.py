"""A request owns its state; everything derived is a property."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import asdict

from harvest.checkpoint.handle import CheckpointHandle
from harvest.engine.sampling import SamplingParams, request_seed
from harvest.protocol.types import FinishReason, RequestClass, RequestOutput, RequestState

__all__ = ["FinishReason", "Request", "RequestClass", "RequestOutput", "RequestState", "RequestStatus"]


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # holds its blocks while a checkpoint is copied into them; not stepped
    RUNNING = "running"
    FINISHED = "finished"


_creation = itertools.count()


class Request:
    """Prompt + generated token ids and one progress counter, `num_computed_tokens`.

    Prefill, chunked prefill and recompute after preemption are all the same thing:
    `num_computed_tokens` catching up with `num_tokens`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_class: RequestClass = RequestClass.OFFLINE,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        self.request_id = request_id
        self.params = params
        self.request_class = RequestClass(request_class)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority  # lower first, within the request's class (protocol/types.py)
        self._created = next(_creation)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # prefix cache bookkeeping (block_manager.py): hashes of full blocks of token_ids, and
        # how many leading blocks of block_table have been offered to the cache
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.seed: int | None = request_seed(params)  # what each sampled token is drawn from
        self.first_scheduled_time: float | None = None  # the queue time's end (engine/metrics.py)
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        # the engine's step time attributed to this request (engine.py `_update`): on whatever
        # device the engine runs, so not called GPU seconds
        self.device_seconds = 0.0
        # the furthest num_computed_tokens got before a preemption: computing a token below it
        # again is a recompute (one the prefix cache or a checkpoint serves back is not)
        self.max_computed_tokens = 0
        self.checkpointed_tokens = 0  # leading tokens whose KV blocks are in the checkpoint store
        # where this request resumes from: another engine's checkpoint until it is loaded, then
        # this engine's (refreshed as blocks are saved); what progress records and exports carry
        self.checkpoint: CheckpointHandle | None = None

    @property
    def order(self) -> tuple[int, float, int]:
        """Priority, then arrival order; ties (a backlog queued at once) broken by creation
        order. The scheduler runs, admits and keeps requests in this order within a class."""
        return (self.priority, self.arrival_time, self._created)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_online(self) -> bool:
        return self.request_class is RequestClass.ONLINE

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def export_state(self) -> RequestState:
        return RequestState(
            request_id=self.request_id,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            params=asdict(self.params),
            request_class=self.request_class.value,
            arrival_time=self.arrival_time,
            checkpoint=self.checkpoint,
            num_preemptions=self.num_preemptions,
            seed=self.seed,
            device_seconds=self.device_seconds,
            priority=self.priority,
        )

    @classmethod
    def from_state(cls, state: RequestState) -> Request:
        params = SamplingParams(**state.params)
        req = cls(state.request_id, state.token_ids[: state.num_prompt_tokens], params, state.request_class,
                  state.arrival_time, state.priority)  # fmt: skip
        req.token_ids = list(state.token_ids)
        req.checkpoint = state.checkpoint
        req.num_preemptions = state.num_preemptions
        req.device_seconds = state.device_seconds
        if state.seed is not None:
            req.seed = state.seed
        return req

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.request_class.value}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_table)})"
        )
