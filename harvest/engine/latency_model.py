"""Step latency as a function of batch shape: profiled at start-up, refined from every step.

The model is linear in six features of a batch, following where a step's time goes in
the model runner: a constant (Python and launch overhead), tokens computed (projections
and MLPs), decode sequences (one batched attention call), prefill chunks (one attention
call each, per layer), padded decode context (the gathered keys/values) and prefill attention
work (query x key tokens). It refits in microseconds and answers the scheduler's one
question: how many more offline tokens fit before the step runs past its latency budget?
"""

from __future__ import annotations

import time
from collections import deque

import torch

from harvest.engine.block_manager import BlockManager
from harvest.engine.request import Request
from harvest.engine.sampling import SamplingParams

NUM_FEATURES = 6


class BatchShape:
    """Running features of a batch being built; cheap to extend one request at a time."""

    __slots__ = ("chunks", "decodes", "max_decode_context", "prefill_attention", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.decodes = 0
        self.chunks = 0
        self.max_decode_context = 0
        self.prefill_attention = 0.0

    @property
    def seqs(self) -> int:
        return self.decodes + self.chunks

    def add(self, num_tokens: int, context_len: int) -> None:
        self.tokens += num_tokens
        if num_tokens == 1:
            self.decodes += 1
            self.max_decode_context = max(self.max_decode_context, context_len + 1)
        else:
            self.chunks += 1
            self.prefill_attention += num_tokens * (context_len + num_tokens) / 1024

    def with_added(self, num_tokens: int, context_len: int) -> BatchShape:
        other = BatchShape()
        other.tokens, other.decodes, other.chunks = self.tokens, self.decodes, self.chunks
        other.max_decode_context, other.prefill_attention = self.max_decode_context, self.prefill_attention
        other.add(num_tokens, context_len)
        return other

    def features(self) -> list[float]:
        # decodes attend in one call over contexts padded to the longest: decodes x max context
        padded = self.decodes * self.max_decode_context / 1024
        return [
            1.0,
            float(self.tokens),
            float(self.decodes),
            float(self.chunks),
            padded,
            self.prefill_attention,
        ]


class LatencyModel:
    """Predicts a step's time; `margin()` says by how much steps overrun their prediction.

    The fit tracks the mean, but on a busy machine steps overrun it (the serving path shares
    the CPU; kernels queue behind others on a GPU): the budget is divided by the recent p90
    of measured / predicted, so the steps that run slow still keep inside their targets.
    """

    def __init__(self, refit_every: int = 32, history: int = 512) -> None:
        self.weights = [0.0] * NUM_FEATURES
        self.profile_samples: list[tuple[list[float], float]] = []
        self.recent: deque[tuple[list[float], float]] = deque(maxlen=history)
        self.overrun: deque[float] = deque(maxlen=256)  # measured / predicted, recent steps
        self.refit_every = refit_every
        self._since_fit = 0
        self._margin = 1.0

    @property
    def fitted(self) -> bool:
        return any(self.weights)

    def predict(self, shape: BatchShape) -> float:
        if shape.seqs == 0:
            return 0.0
        # plain floats: this runs for every offline candidate of every step
        return sum(w * f for w, f in zip(self.weights, shape.features()))

    def observe(self, shape: BatchShape, seconds: float) -> None:
        if (predicted := self.predict(shape)) > 0:
            self.overrun.append(seconds / predicted)
        self.recent.append((shape.features(), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.fit()

    def margin(self) -> float:
        """The recent p90 of measured / predicted step time, at least 1 (updated on refit)."""
        return self._margin

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
        if len(self.overrun) >= self.refit_every:
            ordered = sorted(self.overrun)
            self._margin = max(1.0, ordered[int(0.9 * (len(ordered) - 1))])


def profile_grid(max_tokens: int, max_seqs: int, max_len: int) -> list[list[tuple[int, int]]]:
    """Batch shapes to time, each a list of (new tokens, context) per sequence."""
    top = max_len - 2
    shapes: list[list[tuple[int, int]]] = []
    for chunk in sorted({16, 64, max_tokens // 2, max_tokens}):  # fresh prompts
        shapes.append([(min(chunk, top), 0)])
    for chunk in (32, 128):  # chunked prefill / resume: a chunk after context
        for ctx in sorted({256, max_len // 2}):
            shapes.append([(chunk, min(ctx, top - chunk))])
    for seqs in sorted({1, 4, 16, max_seqs // 2, max_seqs}):  # decodes
        for ctx in sorted({32, 256, max_len // 2}):
            shapes.append([(1, min(ctx, top))] * seqs)
    shapes.append([(1, 256)] * 16 + [(128, 256)])  # what co-serving steps look like
    shapes.append([(32, 128)] * 4)
    shapes.append([(1, 128)] * 8 + [(64, 0)] * 2)
    return [[(n, c) for n, c in shape if n <= max_tokens] for shape in shapes]


def profile(
    execute,
    blocks: BlockManager,
    max_tokens: int,
    max_seqs: int,
    max_len: int,
    repeats: int = 3,
    now=time.perf_counter,
):
    """Time `execute(requests, num_new_tokens)` over `profile_grid` shapes.

    Dummy requests get real blocks (their KV contents are garbage, which costs the same).
    Returns one (shape, seconds) sample per shape: the fastest of `repeats` after two
    warm-ups, since first calls of a new shape (kernel selection, allocator growth) and
    a busy machine only ever add time.
    """
    samples: list[tuple[BatchShape, float]] = []
    for entries in profile_grid(max_tokens, max_seqs, max_len):
        need = sum(-(-(n + c) // blocks.block_size) for n, c in entries)
        if not entries or len(entries) > max_seqs or need > blocks.num_free_blocks:
            continue
        reqs = [
            Request(f"profile-{i}", [1] * (c + n), SamplingParams(max_tokens=1))
            for i, (n, c) in enumerate(entries)
        ]
        shape = BatchShape()
        for r, (n, c) in zip(reqs, entries):
            r.num_computed_tokens = c
            blocks.allocate(r, c + n)
            shape.add(n, c)
        times = []
        for _ in range(2 + repeats):
            start = now()
            execute(reqs, [n for n, _ in entries])
            times.append(now() - start)
        samples.append((shape, min(times[2:])))
        for r in reqs:
            blocks.free(r)
    return samples
