"""The batched sampler; `SamplingParams` (plain data, torch-free) lives in harvest.protocol.

The whole batch is sampled with tensor ops on the logits' device, rows with different
parameters side by side: temperature scales a row, top-k and top-p turn into one cutoff
value per row (tokens below it are masked), and the draw is Gumbel-max,
argmax(logits / T + g), which picks token i with probability softmax(logits / T)_i.
Greedy rows take the argmax. The only copy back to the host is the chosen token ids.

The Gumbel noise g of a row is a pure function of (request seed, position, token id): a
counter-based integer hash computed with int32 tensor ops (`uniform_noise`), no generator
state anywhere. A row's token therefore depends only on its own logits, parameters, seed
and position, never on the batch around it or on the path the request took: a request
resumed anywhere (from a KV checkpoint, or re-queued with its output so far as part of its
prompt) samples what an uninterrupted run would.
"""

from __future__ import annotations

import secrets
from functools import cache

import torch

from harvest.protocol.sampling_params import SamplingParams

__all__ = ["SamplingParams", "request_seed", "sample"]


def request_seed(params: SamplingParams) -> int | None:
    """The seed a request samples with: its own, a fresh random one if it set none, None
    when it is greedy."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else secrets.randbits(63)


_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_GOLDEN64, _GOLDEN32 = 0x9E3779B97F4A7C15, 0x9E3779B9  # Weyl sequence increments
_NOISE_BITS = 23  # (k + 0.5) / 2**23 is exact in float32: u is never 0 or 1


def _int32(value: int) -> int:
    """An unsigned 32-bit value as the int32 with the same bits."""
    value &= _U32
    return value - (1 << 32) if value >> 31 else value


def row_keys(seed: int, position: int) -> tuple[int, int]:
    """The two int32 keys of the noise of the token at `position` of a sequence drawn with
    `seed`: splitmix64 of (seed, position), cut in halves."""
    z = (seed + (position + 1) * _GOLDEN64) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    z ^= z >> 31
    return _int32(z), _int32(z >> 32)


@cache
def _counters(vocab: int, device: torch.device) -> torch.Tensor:
    """token id * golden, wrapped to int32: a Weyl sequence over the vocabulary."""
    return torch.arange(vocab, dtype=torch.int32, device=device) * _int32(_GOLDEN32)


def _xorshift_(z: torch.Tensor, bits: int, scratch: torch.Tensor) -> None:
    """z ^= z >>> bits, in place. torch shifts arithmetically: the copied sign bits are
    masked off to make the shift logical."""
    torch.bitwise_right_shift(z, bits, out=scratch)
    scratch &= (1 << (32 - bits)) - 1
    z ^= scratch


def uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32 [rows, vocab], from the keys [rows, 2] of `row_keys`.

    Token t of a row hashes (t * golden + key0) ^ key1 with lowbias32 (C. Wellons' 32-bit
    integer hash), a bijection of t for each row. int32 rather than int64 because CPUs
    have no vector 64-bit multiply and GPUs no native one. Exact integer arithmetic
    (multiplication wraps around), so every device draws the same."""
    keys = keys.to(torch.int32)
    z = keys[:, :1] + _counters(vocab, keys.device)
    z ^= keys[:, 1:]
    scratch = torch.empty_like(z)
    _xorshift_(z, 16, scratch)
    z *= _int32(0x7FEB352D)
    _xorshift_(z, 15, scratch)
    z *= _int32(0x846CA68B)
    _xorshift_(z, 16, scratch)
    torch.bitwise_right_shift(z, 32 - _NOISE_BITS, out=scratch)
    scratch &= (1 << _NOISE_BITS) - 1
    u = scratch.float()
    u += 0.5
    u *= 1.0 / (1 << _NOISE_BITS)
    return u


def _cutoffs(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """The smallest scaled logit each row keeps under its top-k (0 = off) and top-p (1 = off).

    Ties at the cutoff are all kept. Top-p applies to the distribution left by top-k, and
    keeps the smallest prefix (by probability) whose mass reaches top_p, at least one token.
    Both come from the row's own sorted values. The mass is summed in float64: how many
    sorted values the batch needs (its largest k) changes the order of that sum, and the
    last-bit difference must not move a row's cutoff."""
    device, vocab = scaled.device, scaled.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    width = max(ks)
    # the `width` largest values of each row, in descending order
    if width < vocab:
        values = torch.topk(scaled, width, dim=-1).values
    else:
        values = scaled.sort(dim=-1, descending=True).values
    k = torch.tensor(ks, dtype=torch.int64, device=device)[:, None]
    if all(p >= 1 for p in top_p):
        return values.gather(1, k - 1).squeeze(1)
    p = torch.tensor(top_p, dtype=torch.float64, device=device)[:, None]
    rank = torch.arange(width, device=device)
    values = values.masked_fill(rank >= k, float("-inf"))
    probs = values.softmax(dim=-1, dtype=torch.float64)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank < k) & ((mass_before < p) | (p >= 1))
    # the first token is always kept, unless the row is nan: clamped, it still indexes in
    # bounds (an out-of-bounds gather is a device-side assert on CUDA, fatal to the process)
    last_kept = (keep.sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
    return values.gather(1, last_kept).squeeze(1)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], positions: list[int]
) -> list[int]:
    """One token per row of `logits` ([batch, vocab], float32 on any device); row i's token
    goes to position `positions[i]` of its sequence. Raises when a sampled row's logits are
    not finite (nan, +inf, or all -inf): there is no distribution to draw from."""
    rows = [i for i, (p, seed) in enumerate(zip(params, seeds)) if not (p.greedy or seed is None)]
    if not rows:
        return logits.argmax(dim=-1).tolist()
    device = logits.device
    every_row = len(rows) == len(params)
    index = None if every_row else torch.tensor(rows, device=device)
    drawn = _draw(
        logits if every_row else logits.index_select(0, index),
        [params[i] for i in rows],
        [row_keys(seeds[i], positions[i]) for i in rows],
    )
    if every_row:
        tokens = drawn
    else:
        tokens = logits.argmax(dim=-1)
        tokens[index] = drawn
    out = tokens.tolist()
    if bad := [i for i in rows if out[i] < 0]:
        raise ValueError(f"the logits of sampled row(s) {bad} are nan or inf: no distribution to sample from")
    return out


def _draw(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int]]) -> torch.Tensor:
    """Gumbel-max over the rows of `logits` (all sampled): the token ids, -1 where a row's
    logits are not finite."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits.float() / temperature[:, None]
    # rows with a top-k need only their k largest values (a partial sort); top-p alone needs
    # the whole row sorted. Which group a row is in depends on its own parameters only.
    top_k_rows = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
    top_p_rows = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p < 1]
    if top_k_rows or top_p_rows:
        cutoff = torch.full((len(params),), float("-inf"), device=device)
        for group in (top_k_rows, top_p_rows):
            if not group:
                continue
            top_k, top_p = [params[j].top_k for j in group], [params[j].top_p for j in group]
            if len(group) == len(params):
                cutoff = _cutoffs(scaled, top_k, top_p)
            else:
                at = torch.tensor(group, device=device)
                cutoff[at] = _cutoffs(scaled.index_select(0, at), top_k, top_p)
        scaled.masked_fill_(scaled < cutoff[:, None], float("-inf"))
    noise = uniform_noise(torch.tensor(keys, dtype=torch.int32, device=device), vocab)
    scaled -= noise.log_().neg_().log_()  # + Gumbel noise, -log(-log u)
    best, drawn = scaled.max(dim=-1)
    return drawn.masked_fill(~torch.isfinite(best), -1)
