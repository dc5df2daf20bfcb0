"""Synthetic requests with controlled prompt and output lengths, for load and throughput tests.

No dataset: rows are generated from a seed, so building the requests and scoring their results
regenerate exactly the same targets. Output lengths become `max_tokens`; a model that stops early
at EOS makes them upper bounds (the scored table shows by how much).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from workloads.datasets import Source
from workloads.kinds import WorkloadKind
from workloads.lengths import LengthDist
from workloads.words import filler_text


def mean_or_none(values: list[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


@dataclass
class Synthetic(WorkloadKind):
    """`num_requests` prompts of filler words. Lengths are LengthDist specs ('fixed:128',
    'uniform:32:512', 'lognormal:256:0.5[:MAX]'); an explicit max_tokens fixes every output length."""

    name = "synthetic"
    provides = ("text",)
    default_column = "text"
    default_template = "{text}"
    default_max_tokens = 128

    num_requests: int = 100
    prompt_len: str = "lognormal:256:0.5"
    output_len: str = "lognormal:128:0.5"
    seed: int = 0

    def __post_init__(self) -> None:
        fixed_output = self.max_tokens is not None
        super().__post_init__()
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        self.prompt_dist = LengthDist.parse(self.prompt_len)
        self.output_dist = (
            LengthDist("fixed", self.max_tokens) if fixed_output else LengthDist.parse(self.output_len)
        )

    def generate(self) -> pa.Table:
        rng = random.Random(self.seed)
        prompt_targets, output_targets, texts = [], [], []
        for _ in range(self.num_requests):
            prompt_targets.append(self.prompt_dist.sample(rng))
            output_targets.append(self.output_dist.sample(rng))
            texts.append(filler_text(prompt_targets[-1], rng))
        return pa.table(
            {"text": texts, "prompt_target_tokens": prompt_targets, "output_target_tokens": output_targets},
            schema=pa.schema(
                [
                    ("text", pa.string()),
                    ("prompt_target_tokens", pa.int64()),
                    ("output_target_tokens", pa.int64()),
                ]
            ),
        )

    def open(self, source: Source | None, batch_size: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        if source is not None:
            raise ValueError("the synthetic workload generates its own prompts; pass no dataset")
        table = self.generate()
        return table.schema, iter(table.to_batches(max_chunksize=batch_size))

    def rows_table(self, source: Source | None, schema: pa.Schema) -> pa.Table:
        return self.generate()

    def request_max_tokens(self, row: dict[str, Any]) -> int:
        return row["output_target_tokens"]

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"text": row[self.column]}

    def evaluate(
        self, rows: pa.Table, outputs: list[str | None], results: pa.Table
    ) -> tuple[dict[str, list], dict]:
        targets = rows["output_target_tokens"].to_pylist()
        prompt_targets = rows["prompt_target_tokens"].to_pylist()
        completion = results["completion_tokens"].to_pylist()
        prompt = results["prompt_tokens"].to_pylist()
        # actual/target per request: how closely the server honoured max_tokens (EOS stops early)
        output_ratio = [
            None if out is None or got is None else got / want
            for out, got, want in zip(outputs, completion, targets, strict=True)
        ]
        prompt_ratio = [
            None if out is None or got is None else got / want
            for out, got, want in zip(outputs, prompt, prompt_targets, strict=True)
        ]
        summary = {
            "prompt_len": str(self.prompt_dist),
            "output_len": str(self.output_dist),
            "mean_prompt_target_tokens": mean_or_none(prompt_targets),
            "mean_output_target_tokens": mean_or_none(targets),
            "mean_prompt_ratio": mean_or_none(prompt_ratio),
            "mean_output_ratio": mean_or_none(output_ratio),
        }
        columns = {
            "prompt_target_tokens": prompt_targets,
            "output_target_tokens": targets,
            "prompt_ratio": prompt_ratio,
            "output_ratio": output_ratio,
        }
        return columns, summary
