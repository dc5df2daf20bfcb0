"""The batched sampler; `SamplingParams` (plain data, torch-free) lives in harvest.protocol.

The whole batch is sampled with tensor ops on the logits' device, rows with different
parameters side by side: temperature scales a row, top-k and top-p turn into one cutoff
value per row (tokens below it are masked), and the draw is Gumbel-max,
argmax(logits / T + g), which picks token i with probability softmax(logits / T)_i.

The Gumbel noise g of a row is a pure function of (request seed, position, token id): a
splitmix64 counter hash computed with int64 tensor ops. A row's token therefore depends
only on its own logits, parameters, seed and position, never on the batch around it or on
the path the request took: a request resumed anywhere (from a KV checkpoint, or re-queued
with its output so far as part of its prompt) samples what an uninterrupted run would.
Greedy rows take the argmax. The host sees one transfer per step: the chosen token ids.
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


_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_NOISE_BITS = 23  # (k + 0.5) / 2**23 is exact in float32: u is never 0 or 1


def _int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


def _splitmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def row_key(seed: int, position: int) -> int:
    """The noise stream of the token at `position` of a sequence drawn with `seed`."""
    return _int64(_splitmix64((seed + (position + 1) * _GOLDEN) & _U64))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits: torch shifts arithmetically, so the copied sign
    bits are masked off."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


@cache
def _counters(vocab: int, device: torch.device) -> torch.Tensor:
    """(token id + 1) * golden, wrapped to int64: the splitmix64 counter of each token."""
    ids = torch.arange(1, vocab + 1, dtype=torch.int64, device=device)
    return ids * _int64(_GOLDEN)  # int64 multiplication wraps around, as uint64 would


def uniform_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), float32 [rows, vocab]: splitmix64 output number `token id + 1` of the
    stream `keys[row]` (int64 [rows]). Exact integer arithmetic, so any device agrees."""
    z = keys[:, None] + _counters(vocab, keys.device)
    z ^= _shift_right(z, 30)
    z *= _int64(_MIX1)
    z ^= _shift_right(z, 27)
    z *= _int64(_MIX2)
    z ^= _shift_right(z, 31)
    top = _shift_right(z, 64 - _NOISE_BITS).float()
    return (top + 0.5) * (1.0 / (1 << _NOISE_BITS))


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
    last_kept = keep.sum(dim=-1, keepdim=True) - 1  # the first token is always kept
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
        logits if every_row else logits[index],
        [params[i] for i in rows],
        [row_key(seeds[i], positions[i]) for i in rows],
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


def _draw(logits: torch.Tensor, params: list[SamplingParams], keys: list[int]) -> torch.Tensor:
    """Gumbel-max over the rows of `logits` (all sampled): the token ids, -1 where a row's
    logits are not finite."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = logits.float() / temperature[:, None]
    filtered = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if filtered:
        top_k, top_p = [params[j].top_k for j in filtered], [params[j].top_p for j in filtered]
        if len(filtered) == len(params):
            cutoff = _cutoffs(scaled, top_k, top_p)
        else:
            at = torch.tensor(filtered, device=device)
            cutoff = torch.full((len(params),), float("-inf"), device=device)
            cutoff[at] = _cutoffs(scaled[at], top_k, top_p)
        scaled.masked_fill_(scaled < cutoff[:, None], float("-inf"))
    noise = uniform_noise(torch.tensor(keys, dtype=torch.int64, device=device), scaled.shape[-1])
    gumbel = noise.log_().neg_().log_().neg_()  # -log(-log u)
    best, drawn = (scaled + gumbel).max(dim=-1)
    return drawn.masked_fill(~torch.isfinite(best), -1)
