"""The vectorised sampler: its noise is the splitmix64 it claims, its draws follow the
filtered distribution, and a row's token depends only on that row (not on the batch)."""

from __future__ import annotations

import math

import pytest
import torch

from harvest.engine.fault import sample_rows
from harvest.engine.request import Request
from harvest.engine.sampling import SamplingParams, row_keys, sample, uniform_noise

LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
Batch = tuple[torch.Tensor, list[SamplingParams], list[int | None], list[int]]  # sample()'s arguments


def splitmix64(z: int) -> int:
    """The reference output function, on Python's exact integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & U32
    return x ^ (x >> 16)


def reference_uniform(seed: int, position: int, token: int) -> float:
    key = splitmix64((seed + (position + 1) * 0x9E3779B97F4A7C15) & U64)
    bits = lowbias32(((token * 0x9E3779B9 + key) & U32) ^ (key >> 32)) >> 9
    return (bits + 0.5) / 2**23


def expected_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """softmax(logits / T), cut to the top-k and then the top-p nucleus, renormalised."""
    weights = [math.exp(x / p.temperature) for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[: p.top_k] if p.top_k else order
    total = sum(weights[i] for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= p.top_p:
            break
        nucleus.append(i)
        mass += weights[i] / total
    norm = sum(weights[i] for i in nucleus)
    return [weights[i] / norm if i in nucleus else 0.0 for i in range(len(logits))]


def draw_many(p: SamplingParams, n: int = 4000) -> list[int]:
    """n draws of the same row, as one batch: 40 seeds x 100 positions."""
    logits = torch.tensor([LOGITS] * n)
    return sample(logits, [p] * n, [7 + i // 100 for i in range(n)], [i % 100 for i in range(n)])


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs) if q > 0)


def chi_square_bound(df: int) -> float:
    """Far in the tail (about 6 standard deviations): a right distribution stays below it."""
    return df + 6 * math.sqrt(2 * df)


def test_noise_is_the_hash_of_seed_position_and_token():
    cases = [(0, 0), (5, 3), (-7, 1000), (2**63 - 1, 123456), (-(2**63), 2**31)]
    u = uniform_noise(torch.tensor([row_keys(seed, position) for seed, position in cases]), 1000)
    for row, (seed, position) in enumerate(cases):
        for token in (0, 1, 500, 999):
            assert u[row, token].item() == reference_uniform(seed, position, token), (seed, position, token)
    assert u.min().item() > 0 and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
    ],
    ids=["plain", "cold", "top_k", "top_p", "top_k_top_p"],
)
def test_draws_follow_the_filtered_distribution(params):
    tokens = draw_many(params)
    counts = [tokens.count(i) for i in range(len(LOGITS))]
    probs = expected_probs(LOGITS, params)
    support = sum(q > 0 for q in probs)
    assert all(c == 0 for c, q in zip(counts, probs) if q == 0), counts  # nothing outside the filter
    assert chi_square(counts, probs) < chi_square_bound(support - 1), (counts, probs)
    # the check can fail: the same draws are far from the unfiltered, untempered softmax
    plain = expected_probs(LOGITS, SamplingParams())
    if params != SamplingParams():
        assert chi_square(counts, plain) > chi_square_bound(len(LOGITS) - 1) or any(
            c == 0 for c, q in zip(counts, plain) if q > 0.01
        )


@pytest.mark.parametrize("step", [(0, 1), (1, 0)], ids=["next_position", "next_seed"])
def test_neighbouring_draws_are_independent(step):
    """Pairs of draws one position (or one seed) apart fill a 4 x 4 table uniformly."""
    n, vocab = 4096, 4
    seeds, positions = [i // 64 for i in range(n)], [i % 64 * 2 for i in range(n)]
    logits, params = torch.zeros(n, vocab), [SamplingParams()] * n
    first = sample(logits, params, seeds, positions)
    second = sample(logits, params, [s + step[0] for s in seeds], [p + step[1] for p in positions])
    counts = [0] * vocab**2
    for a, b in zip(first, second):
        counts[a * vocab + b] += 1
    assert chi_square(counts, [1 / vocab**2] * vocab**2) < chi_square_bound(vocab**2 - 1), counts


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=1), SamplingParams()]
    params.append(SamplingParams(temperature=0.7))
    tokens = sample(logits, params, [None, None, None, 3], [0, 0, 0, 0])
    assert tokens[:3] == logits.argmax(dim=-1).tolist()[:3]  # seed None: greedy as well
    assert 0 <= tokens[3] < 50


def mixed_batch(vocab: int, rows: int = 24) -> Batch:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[:, :10] = logits[:, :1]  # ties, as bf16 logits have: the cutoffs keep them all
    choices = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.7),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.95),
        SamplingParams(temperature=1.0, top_k=vocab + 5),  # more than the vocabulary: off
        SamplingParams(temperature=0.7, top_p=0.05),  # one token's mass or less: the top one
    ]
    params = [choices[i % len(choices)] for i in range(rows)]
    seeds = [None if p.greedy else 1000 + i for i, p in enumerate(params)]
    return logits, params, seeds, [3 * i for i in range(rows)]


def pick(batch: Batch, rows: list[int]) -> Batch:
    logits, params, seeds, positions = batch
    return logits[rows], [params[i] for i in rows], [seeds[i] for i in rows], [positions[i] for i in rows]


@pytest.mark.parametrize("vocab", [64, 512])
def test_a_row_samples_the_same_alone_and_in_any_mixed_batch(vocab):
    batch = mixed_batch(vocab)
    n = len(batch[1])
    tokens = sample(*batch)
    assert [sample(*pick(batch, [i]))[0] for i in range(n)] == tokens
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    assert sample(*pick(batch, shuffled)) == [tokens[i] for i in shuffled]
    odd = list(range(1, n, 2))  # other neighbours, other widths for the top-k rows
    assert sample(*pick(batch, odd)) == [tokens[i] for i in odd]
    # and the draws do depend on seed and position
    logits, params, seeds, positions = batch
    moved = sample(logits, params, seeds, [p + 1 for p in positions])
    reseeded = sample(logits, params, [s and s + 1 for s in seeds], positions)
    sampled = [i for i, s in enumerate(seeds) if s is not None and params[i].top_p > 0.05]
    assert any(moved[i] != tokens[i] for i in sampled)
    assert any(reseeded[i] != tokens[i] for i in sampled)


def test_top_p_below_the_top_tokens_mass_keeps_only_it():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 200)
    params = [SamplingParams(temperature=1.0, top_p=0.1)] * 200
    assert set(sample(logits, params, list(range(200)), [0] * 200)) == {1}


def test_a_non_finite_sampled_row_raises_and_only_its_request_fails():
    vocab = 32
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    logits[1, 5] = float("nan")
    greedy_nan = logits.clone()
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(3)]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sample(logits, params, [0, 1, 2], [0, 0, 0])
    assert sample(greedy_nan, [SamplingParams(temperature=0)] * 3, [None] * 3, [0] * 3)[0] == int(
        greedy_nan[0].argmax()
    )
    requests = [Request(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    tokens, errors = sample_rows(sample, logits, requests)
    assert list(errors) == ["r1"]
    good = [0, 2]
    assert [tokens[i] for i in good] == [
        sample(logits[i : i + 1], params[i : i + 1], [requests[i].seed], [2])[0] for i in good
    ]
    logits[2] = float("-inf")  # nothing to draw from at all
    _, errors = sample_rows(sample, logits, requests)
    assert sorted(errors) == ["r1", "r2"]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=5),
    ],
    ids=["top_p", "top_k_top_p", "top_k"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_row_under_top_k_or_top_p_is_an_error_of_its_own(params, bad):
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    logits[1] = bad if bad == float("-inf") else logits[1].index_fill(0, torch.tensor([7]), bad)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sample(logits, [params] * 3, [0, 1, 2], [0, 0, 0])
    good = sample(logits[[0, 2]], [params] * 2, [0, 2], [0, 0])
    assert [sample(logits[i : i + 1], [params], [i], [0])[0] for i in (0, 2)] == good


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_tokens_as_the_cpu():
    logits, params, seeds, positions = mixed_batch(32000, rows=64)
    keys = torch.tensor([row_keys(s or 0, p) for s, p in zip(seeds, positions)])
    assert torch.equal(uniform_noise(keys.cuda(), 32000).cpu(), uniform_noise(keys, 32000))
    assert sample(logits.cuda(), params, seeds, positions) == sample(logits, params, seeds, positions)


def test_bench_measures_both_samplers_on_each_case():
    from workloads.bench.sampler import measure_cases

    cases = measure_cases([512], [1, 4], repeats=2, device="cpu")
    shapes = [(c["batch"], c["mix"], c["sampled_rows"]) for c in cases]
    assert shapes == [(1, "sampled", 1), (4, "mixed", 2), (4, "sampled", 4)]
    for c in cases:
        assert all(len(v) == 2 and min(v) > 0 for v in c["samples_ms"].values())
        assert c["speedup"] == c["row_loop_ms"] / c["vectorised_ms"]
