"""`harvest bench sampler`: the sampler's cost per step, the vectorised one vs the row loop
it replaced, side by side in one process.

Cases: vocabularies of the tiny test model (512), 32k and 128k; batches of 1, 32 and 64
rows; "mixed" (every other row greedy) and "sampled" (every row sampled). Sampled rows
cycle through four common settings (temperature alone, top-p, top-k, both). Each
(case, sampler) is timed `repeats` times, the two samplers interleaved, after a warm-up;
the median is reported. Runs on CUDA when there is a device, else on the CPU with one
torch thread: on a shared box, a second intra-op thread that is not scheduled stalls every
large op at its barrier, which would measure the neighbours rather than the sampler.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import torch

from harvest.engine.sampling import SamplingParams, sample
from workloads.bench.common import console, print_table, write_result

SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_p=0.95),
    SamplingParams(temperature=0.7, top_k=50),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9),
]
GREEDY = SamplingParams(temperature=0)


def row_loop_sample(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], positions: list[int]
) -> list[int]:
    """The sampler before the vectorised one: per sampled row, a copy to the host and a
    `torch.Generator` seeded by splitmix64 of (seed, position)."""
    mask = (1 << 64) - 1
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
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        z = (seed + (positions[row] + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        generator = torch.Generator().manual_seed(z ^ (z >> 31))
        next_ids[row] = int(torch.multinomial(probs, 1, generator=generator))
    return next_ids


SAMPLERS = {"row_loop": row_loop_sample, "vectorised": sample}


def make_case(vocab: int, batch: int, mix: str, device: str):
    gen = torch.Generator().manual_seed(vocab + batch)
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(device)
    settings = itertools.cycle(SETTINGS)
    params = [GREEDY if mix == "mixed" and row % 2 else next(settings) for row in range(batch)]
    seeds = [None if p.greedy else 1000 + row for row, p in enumerate(params)]
    positions = [100 + row for row in range(batch)]
    return logits, params, seeds, positions


def measure(case: tuple, repeats: int, device: str) -> dict[str, list[float]]:
    """Milliseconds per call of each sampler on `case`, interleaved, after a warm-up."""
    for fn in SAMPLERS.values():
        fn(*case)
    samples: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    for _ in range(repeats):
        for name, fn in SAMPLERS.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(*case)  # returns a list: waits for the device
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def measure_cases(vocabs: list[int], batches: list[int], repeats: int, device: str) -> list[dict]:
    cases = []
    for vocab in vocabs:
        for batch in batches:
            for mix in ("mixed", "sampled"):
                if batch == 1 and mix == "mixed":
                    continue  # one row is either greedy (an argmax) or sampled
                case = make_case(vocab, batch, mix, device)
                samples = measure(case, repeats, device)
                median = {name: statistics.median(v) for name, v in samples.items()}
                cases.append(
                    {
                        "vocab": vocab,
                        "batch": batch,
                        "mix": mix,
                        "sampled_rows": sum(s is not None for s in case[2]),
                        "row_loop_ms": median["row_loop"],
                        "vectorised_ms": median["vectorised"],
                        "speedup": median["row_loop"] / median["vectorised"],
                        "samples_ms": samples,
                    }
                )
                console.print(f"vocab {vocab} batch {batch} {mix}: {median}")
    return cases


def run(quick: bool, out: Path) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocabs, batches, repeats = ([512, 32000], [1, 32], 3) if quick else ([512, 32000, 128256], [1, 32, 64], 7)
    threads = torch.get_num_threads()
    try:
        if device == "cpu":
            torch.set_num_threads(1)
        cases = measure_cases(vocabs, batches, repeats, device)
    finally:
        torch.set_num_threads(threads)
    columns = ["vocab", "batch", "mix", "sampled_rows", "row_loop_ms", "vectorised_ms", "speedup"]
    print_table(
        f"sampler cost per step on {device} (median of {repeats}, ms)",
        ["vocab", "batch", "rows", "sampled", "row loop", "vectorised", "speedup"],
        [[c[k] for k in columns] for c in cases],
    )
    result = {
        "cases": cases,
        "config": {
            "quick": quick,
            "device": device,
            "repeats": repeats,
            "vocabs": vocabs,
            "batches": batches,
            "settings": [vars(p) for p in SETTINGS],
            "torch_threads": 1 if device == "cpu" else threads,
        },
    }
    write_result(out, "sampler", result)
    return result
