"""Bulk classification: short prompts, short outputs, the label parsed out of free text against a
fixed label set, and the label distribution (plus accuracy where the dataset has gold labels).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from workloads.datasets import Source, read_table
from workloads.kinds import WorkloadKind

UNPARSED = "unparsed"


def parse_label(output: str, labels: tuple[str, ...] | list[str]) -> str:
    """The label mentioned first in the output (case-insensitive, whole words; the longest wins when
    two start at the same place, so "very negative" beats "negative"), else "unparsed"."""
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", output, re.IGNORECASE)
        if found and (best is None or (found.start(), -len(label)) < best[:2]):
            best = (found.start(), -len(label), label)
    return best[2] if best else UNPARSED


@dataclass
class Classify(WorkloadKind):
    """Label the text in `column` with one of `labels`. When `labels` is empty they are taken from
    the distinct values of `label_column`; when that column exists, accuracy is reported too."""

    name = "classify"
    provides = ("text", "labels")
    default_column = "text"
    default_template = (
        "Classify the following text as one of: {labels}. Reply with the label only.\n\n"
        "Text: {text}\n\nLabel:"
    )
    default_max_tokens = 8

    labels: tuple[str, ...] = ()
    label_column: str = "label"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.labels, str):
            self.labels = tuple(label.strip() for label in self.labels.split(","))
        self.labels = tuple(label for label in self.labels if label)

    def open(self, source: Source | None, batch_size: int):
        schema, batches = super().open(source, batch_size)
        if not self.labels:
            self.labels = self.labels_from(source, schema)
        return schema, batches

    def labels_from(self, source: Source, schema: pa.Schema) -> tuple[str, ...]:
        if self.label_column not in schema.names:
            raise ValueError(
                f"classify needs labels: pass labels=a,b,c or give the dataset a {self.label_column!r} column"
            )
        values = pc.unique(read_table(source, columns=[self.label_column])[self.label_column])
        return tuple(sorted(str(v) for v in values.drop_null().to_pylist()))

    def input_columns(self, schema: pa.Schema) -> list[str]:
        extra = [self.label_column] if self.label_column in schema.names else []
        return [self.column, *extra]

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"text": row[self.column], "labels": ", ".join(self.labels)}

    def evaluate(
        self, rows: pa.Table, outputs: list[str | None], results: pa.Table
    ) -> tuple[dict[str, list], dict]:
        predicted = [None if out is None else parse_label(out, self.labels) for out in outputs]
        counts = Counter(p for p in predicted if p is not None)
        summary: dict[str, Any] = {
            "labels": list(self.labels),
            "distribution": {label: counts.get(label, 0) for label in (*self.labels, UNPARSED)},
            "unparsed": counts.get(UNPARSED, 0),
        }
        columns: dict[str, list] = {"predicted": predicted}
        if self.label_column in rows.column_names:
            gold = [None if g is None else str(g) for g in rows[self.label_column].to_pylist()]
            correct = [
                None if p is None or g is None else p.lower() == g.lower()
                for p, g in zip(predicted, gold, strict=True)
            ]
            scored = [c for c in correct if c is not None]
            summary["accuracy"] = sum(scored) / len(scored) if scored else None
            columns |= {"gold": gold, "correct": correct}
        return columns, summary
