"""Document summarisation: long prompts, medium outputs, scored by length and compression."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from workloads.kinds import WorkloadKind


def word_count(text: str | None) -> int:
    return len(text.split()) if text else 0


@dataclass
class Summarize(WorkloadKind):
    """Summarise the document in `column`. Without references there is no quality score here; the
    summary reports what can be checked mechanically: empty, cut-off and over-long summaries.
    """

    name = "summarize"
    provides = ("text",)
    default_column = "text"
    default_template = "Summarise the following document in a few sentences.\n\n{text}\n\nSummary:"
    default_max_tokens = 128

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"text": row[self.column]}

    def evaluate(
        self, rows: pa.Table, outputs: list[str | None], results: pa.Table
    ) -> tuple[dict[str, list], dict]:
        documents = rows[self.column].to_pylist()
        summaries = [None if out is None else out.strip() for out in outputs]
        summary_words = [None if s is None else word_count(s) for s in summaries]
        compression = [
            None if words is None or not word_count(doc) else words / word_count(doc)
            for words, doc in zip(summary_words, documents, strict=True)
        ]
        done = [w for w in summary_words if w is not None]
        ratios = [c for c in compression if c is not None]
        summary = {
            "empty_summaries": sum(1 for w in done if w == 0),
            "mean_summary_words": statistics.fmean(done) if done else None,
            "mean_compression": statistics.fmean(ratios) if ratios else None,
            # a "summary" as long as its document is a copy or a ramble, not a summary
            "not_shorter": sum(1 for c in ratios if c >= 1.0),
        }
        columns = {
            "summary": summaries,
            "document_words": [word_count(d) for d in documents],
            "summary_words": summary_words,
            "compression": compression,
        }
        return columns, summary
