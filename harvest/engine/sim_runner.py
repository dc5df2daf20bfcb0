"""The simulated device: `ModelRunner`'s interface, a sleep for a forward, hashed tokens.

`device="sim[:PROFILE]"` swaps this in for `ModelRunner`, so the real scheduler, block
manager, checkpointer, queue worker and service run unchanged over a device that costs a
sliver of a core: a step sleeps (releasing the GIL) for what the step-latency profile
predicts for its batch (harvest/engine/sim_profile.py), and nothing spins.

Tokens are a function of the context: the runner keeps one 63-bit rolling hash per
position in its "KV cache" (hash of position p = mix(hash of p - 1, token p, p)), and the
token after position p is drawn from its hash. The cache is tiny (one int64 per slot), but
it is a real paged pool that the Checkpointer copies and restores block by block, so a
request preempted, checkpointed, resumed here or on another engine continues exactly as an
uninterrupted run would, and a broken restore shows up as different tokens.

The model directory is still read, for its config (vocab size, context length, KV shape:
the block budget is sized as for the real model) and, by the engine, its tokenizer: the
simulated requests are then the real ones, prompts and all, and detokenizing works.
Sampling parameters do not change the token: each sampled row has one overwhelming logit.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from transformers import AutoConfig, GenerationConfig

from harvest.engine.attention import LayerAbort
from harvest.engine.clock import WALL, Clock
from harvest.engine.latency_model import BatchShape
from harvest.engine.model_runner import DTYPES, ModelShape
from harvest.engine.request import Request
from harvest.engine.sim_profile import StepProfile, profile_for

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1  # hashes live in an int64 tensor
_SEED = 0x5EED
_PEAK = 1e4  # the sampled token's logit: certain at any temperature, top-k or top-p
ABORT_POLL_S = 1e-3  # a layer abort lands within this (a real 8B step: 32 layers in ~8 ms)


def mix(state: int, token: int, position: int) -> int:
    """splitmix64 of the previous position's hash, this token and its position."""
    z = (state ^ (token * 0x9E3779B97F4A7C15 + position)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


class SimulatedRunner:
    """Drop-in for `ModelRunner` on `device="sim[:PROFILE]"`; see the module docstring."""

    def __init__(
        self, model_path: str, device: str, dtype: str, num_blocks: int, block_size: int, clock: Clock = WALL
    ) -> None:
        self.profile: StepProfile = profile_for(device)
        self.clock = clock
        self.device = torch.device("cpu")
        self.dtype = DTYPES[dtype]
        self.block_size = block_size
        config = AutoConfig.from_pretrained(model_path)
        self.shape = ModelShape.from_config(config)
        self.vocab_size = config.get_text_config().vocab_size
        # the engine reads only the generation config (its eos ids) from the model
        try:
            generation = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: what transformers derives from the config
            generation = GenerationConfig.from_model_config(config)
        self.model = SimpleNamespace(generation_config=generation)
        # [layers, 2, slots, kv_heads, head_dim] as the Checkpointer expects: one hash per slot
        self.kv_cache = torch.zeros(1, 2, num_blocks * block_size, 1, 1, dtype=torch.int64)
        self.slot_hashes = self.kv_cache.view(-1)[: num_blocks * block_size]  # layer 0, "keys"
        self.device_s = 0.0  # simulated device time of the steps run to the end

    def _slot(self, req: Request, position: int) -> int:
        return req.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def execute_synchronized(self, requests: list[Request], num_new_tokens: list[int]) -> torch.Tensor:
        return self.execute(requests, num_new_tokens)  # its sleep is the whole step

    def execute(
        self,
        requests: list[Request],
        num_new_tokens: list[int],
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Sleep for the profile's step time; returns logits [num_sampling_rows, vocab]."""
        start = self.clock.now()
        shape = BatchShape()
        for req, n in zip(requests, num_new_tokens):
            shape.add(n, req.num_computed_tokens)
        seconds = self.profile.predict(shape)
        slots, hashes, sampled = self._hash(requests, num_new_tokens)
        # the step's time is spread over its layers, an abort seen at the next boundary; but
        # a wake-up costs CPU (tens of us) and a core to run on, so layers are polled no
        # more often than every ABORT_POLL_S, and a step nothing can abort sleeps once
        slices = 1 if abort is None else max(1, min(self.profile.layers, int(seconds / ABORT_POLL_S)))
        for i in range(slices):
            if abort is not None and abort():
                raise LayerAbort
            # absolute deadlines: a sleep's overshoot is not carried into the next slice
            wait = start + seconds * (i + 1) / slices - self.clock.now()
            if wait > 0:
                self.clock.sleep(wait)
        self.device_s += seconds
        if slots:
            self.slot_hashes.index_copy_(0, torch.tensor(slots), torch.tensor(hashes))
        logits = torch.zeros(len(sampled), self.vocab_size)
        if sampled:
            tokens = torch.tensor([h % self.vocab_size for h in sampled])
            logits[torch.arange(len(sampled)), tokens] = _PEAK
        return logits

    def _hash(
        self, requests: list[Request], num_new_tokens: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """The slots and hashes of the step's new positions, and the last hash of each
        sampling row."""
        starts = [req.num_computed_tokens for req in requests]
        prev_slots = [self._slot(req, s - 1) if s > 0 else 0 for req, s in zip(requests, starts)]
        prev = self.slot_hashes.index_select(0, torch.tensor(prev_slots, dtype=torch.long)).tolist()
        slots: list[int] = []
        hashes: list[int] = []
        sampled: list[int] = []
        for req, n, start, state in zip(requests, num_new_tokens, starts, prev):
            state = state if start > 0 else _SEED
            ids = req.token_ids
            for pos in range(start, start + n):
                state = mix(state, ids[pos], pos)
                slots.append(self._slot(req, pos))
                hashes.append(state)
            if start + n == req.num_tokens:
                sampled.append(state)
        return slots, hashes, sampled
