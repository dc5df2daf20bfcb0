"""Step latency as a function of batch shape: profiled at start-up, refined from every step.

The model is linear in four features of a batch: a constant (launch and Python overhead),
tokens computed (the MLPs and projections), sequences (per-sequence attention calls and
sampling) and attention work (query tokens x context tokens). It is small enough to
refit in microseconds and good enough to answer the scheduler's one question: how many
more offline tokens fit in this step before it runs past the online latency budget?
"""

from __future__ import annotations

import time
from collections import deque

import torch

from harvest.engine.block_manager import BlockManager
from harvest.engine.request import Request
from harvest.engine.sampling import SamplingParams


class BatchShape:
    """Running features of a batch being built; cheap to extend one request at a time."""

    __slots__ = ("attention", "seqs", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.seqs = 0
        self.attention = 0.0

    def add(self, num_tokens: int, context_len: int) -> None:
        self.tokens += num_tokens
        self.seqs += 1
        self.attention += num_tokens * (context_len + num_tokens) / 1024

    def with_added(self, num_tokens: int, context_len: int) -> BatchShape:
        other = BatchShape()
        other.tokens, other.seqs, other.attention = self.tokens, self.seqs, self.attention
        other.add(num_tokens, context_len)
        return other

    def features(self) -> list[float]:
        return [1.0, float(self.tokens), float(self.seqs), self.attention]


class LatencyModel:
    def __init__(self, refit_every: int = 32, history: int = 512) -> None:
        self.weights = [0.0] * 4
        self.profile_samples: list[tuple[list[float], float]] = []
        self.recent: deque[tuple[list[float], float]] = deque(maxlen=history)
        self.refit_every = refit_every
        self._since_fit = 0

    @property
    def fitted(self) -> bool:
        return any(self.weights)

    def predict(self, shape: BatchShape) -> float:
        if shape.seqs == 0:
            return 0.0
        w = self.weights  # plain floats: called for every offline candidate of every step
        return w[0] + w[1] * shape.tokens + w[2] * shape.seqs + w[3] * shape.attention

    def observe(self, shape: BatchShape, seconds: float) -> None:
        self.recent.append((shape.features(), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.fit()

    def fit(self) -> None:
        samples = self.profile_samples + list(self.recent)
        if len(samples) < 4:
            return
        x = torch.tensor([f for f, _ in samples], dtype=torch.float64)
        y = torch.tensor([t for _, t in samples], dtype=torch.float64)
        w = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        # latency never falls as a batch grows: a negative slope is noise, drop it and refit
        if (w[1:] < 0).any():
            keep = torch.cat([torch.tensor([True]), w[1:] >= 0])
            w = torch.zeros_like(w)
            w[keep] = torch.linalg.lstsq(x[:, keep], y[:, None]).solution[:, 0]
        self.weights = w.clamp(min=0).tolist()
        self._since_fit = 0


def profile(execute, blocks: BlockManager, max_tokens: int, max_seqs: int, max_len: int, repeats: int = 2):
    """Time `execute(requests, num_new_tokens)` over a grid of prefill and decode shapes.

    Dummy requests get real blocks (their KV contents are garbage, which costs the same).
    Returns (shape, seconds) samples.
    """
    capacity = blocks.num_free_blocks * blocks.block_size
    samples: list[tuple[BatchShape, float]] = []
    grid: list[tuple[int, int, int]] = []  # (sequences, new tokens each, context each)
    for chunk in sorted({16, 64, max_tokens // 2, max_tokens}):
        grid.append((1, min(chunk, max_tokens, max_len - 1), 0))
    for seqs in sorted({1, 4, 16, max_seqs // 2, max_seqs}):
        for ctx in sorted({32, 256, max_len // 2}):
            grid.append((min(seqs, max_tokens), 1, min(ctx, max_len - 2)))
    for seqs, n, ctx in grid:
        if seqs < 1 or n < 1 or seqs * (ctx + n + blocks.block_size) > capacity:
            continue
        reqs = [Request(f"profile-{i}", [1] * (ctx + n), SamplingParams(max_tokens=1)) for i in range(seqs)]
        for r in reqs:
            r.num_computed_tokens = ctx
            blocks.allocate(r, ctx + n)
        shape = BatchShape()
        for _ in reqs:
            shape.add(n, ctx)
        execute(reqs, [n] * seqs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            execute(reqs, [n] * seqs)
            samples.append((shape, time.perf_counter() - start))
        for r in reqs:
            blocks.free(r)
    return samples
