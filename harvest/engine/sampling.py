"""The batched sampler; `SamplingParams` (plain data, torch-free) lives in harvest.protocol."""

from __future__ import annotations

import secrets

import torch

from harvest.protocol.sampling_params import SamplingParams

__all__ = ["SamplingParams", "request_seed", "sample"]


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
