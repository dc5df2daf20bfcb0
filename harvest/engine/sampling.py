"""Sampling parameters (OpenAI/vLLM semantics) and the batched sampler."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


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
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def request_seed(params: SamplingParams) -> int | None:
    """The seed a request samples with: its own, a fresh random one if it set none, None
    when it is greedy."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


_MASK = (1 << 64) - 1


def _token_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the token at `position` of a sequence: seeded from (request seed,
    position) by splitmix64, so each draw depends on neither the batch nor the path the
    request took. A request resumed anywhere, from a KV checkpoint or re-queued with its
    output so far as part of its prompt, samples what an uninterrupted run would."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return torch.Generator().manual_seed(z ^ (z >> 31))


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], positions: list[int]
) -> list[int]:
    """One token per row of `logits` ([batch, vocab], float32 on any device); row i's token
    goes to position `positions[i]` of its sequence."""
    next_ids = logits.argmax(dim=-1).tolist()
    for row, (p, seed) in enumerate(zip(params, seeds)):
        if p.greedy or seed is None:
            continue
        scores = logits[row].float().cpu() / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        next_ids[row] = int(torch.multinomial(probs, 1, generator=_token_generator(seed, positions[row])))
    return next_ids
