"""The shape shared by every offline workload kind: dataset rows in, OpenAI Batch request lines out,
results joined back on custom_id and scored.

A kind is a dataclass whose fields are its options (so `make_kind(name, **options)` validates them
for free). It says which prompt fields it derives from a row (`fields`) and what a result means
(`evaluate`); reading, templating, the request format and the join live here once.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from workloads.datasets import Source, open_batches, read_table, require_columns
from workloads.templates import PromptTemplate

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
RESULT_COLUMNS = (
    "custom_id",
    "prompt",
    "text",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
)


def request_line(custom_id: str, model: str, prompt: str, max_tokens: int, chat: bool = False) -> dict:
    """One line of an OpenAI Batch API input file; temperature 0 so reruns and resumes agree."""
    if chat:
        url, body = CHAT_URL, {"model": model, "messages": [{"role": "user", "content": prompt}]}
    else:
        url, body = COMPLETIONS_URL, {"model": model, "prompt": prompt}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


@dataclass
class WorkloadKind(ABC):
    """Base of the offline workload kinds. Subclasses set the class constants and two methods."""

    name: ClassVar[str]
    provides: ClassVar[tuple[str, ...]]  # the template fields `fields()` fills in
    default_column: ClassVar[str] = "text"
    default_template: ClassVar[str]
    default_max_tokens: ClassVar[int]

    column: str | None = None
    template: str | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.column is None:
            self.column = self.default_column
        if self.max_tokens is None:
            self.max_tokens = self.default_max_tokens
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.prompt_template = PromptTemplate(self.template or self.default_template)

    # ---- what a kind defines -------------------------------------------------------------------

    @abstractmethod
    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """Values of the `provides` fields for one dataset row."""

    @abstractmethod
    def evaluate(
        self, rows: pa.Table, outputs: list[str | None], results: pa.Table
    ) -> tuple[dict[str, list], dict]:
        """Per-row result columns and a summary. `outputs[i]` is None where row i has no good result;
        `results` is the results table aligned with `rows`."""

    def input_columns(self, schema: pa.Schema) -> list[str]:
        """Dataset columns this kind reads (checked up front; scoring reads only these)."""
        return [self.column]

    def score_columns(self, schema: pa.Schema) -> list[str]:
        """Dataset columns scoring reads: by default the same as for building requests."""
        return self.input_columns(schema)

    def request_max_tokens(self, row: dict[str, Any]) -> int:
        return self.max_tokens

    def open(self, source: Source | None, batch_size: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        if source is None:
            raise ValueError(f"the {self.name} workload needs a dataset (a path or a table)")
        return open_batches(source, batch_size)

    # ---- shared machinery ----------------------------------------------------------------------

    def prepare(self, schema: pa.Schema) -> None:
        """Fail before the first request on a missing column or an unknown template field."""
        require_columns(schema, self.input_columns(schema))
        self.prompt_template.check(self.provides, schema.names, self.name)

    def requests(self, source: Source | None, model: str, chat: bool = False) -> Iterator[dict]:
        """Request lines, one per dataset row, custom_id '<kind>-<row>' (row counts from 0)."""
        schema, batches = self.open(source, batch_size=1024)
        self.prepare(schema)
        return self.request_lines(batches, model, chat)

    def request_lines(self, batches: Iterator[pa.RecordBatch], model: str, chat: bool) -> Iterator[dict]:
        row_index = 0
        for batch in batches:
            for row in batch.to_pylist():
                prompt = self.prompt_template.render({**row, **self.fields(row)})
                max_tokens = self.request_max_tokens(row)
                yield request_line(f"{self.name}-{row_index}", model, prompt, max_tokens, chat)
                row_index += 1

    def score(self, source: Source | None, results: Source) -> tuple[pa.Table, dict]:
        """Join results to the dataset on custom_id and score them; the table keeps dataset order."""
        schema, _ = self.open(source, batch_size=1)
        self.prepare(schema)
        rows = self.rows_table(source, schema)
        if "custom_id" in rows.column_names:
            ids = rows["custom_id"].cast(pa.string())
        else:
            ids = pa.array([f"{self.name}-{i}" for i in range(rows.num_rows)], pa.string())
        aligned = align_results(ids, results if isinstance(results, pa.Table) else read_table(results))
        errors = aligned["error"].to_pylist()
        texts = aligned["text"].to_pylist()
        found = pc.is_valid(aligned["custom_id"]).to_pylist()
        status = [
            "missing" if not f else "error" if e or t is None else "ok"
            for f, e, t in zip(found, errors, texts, strict=True)
        ]
        outputs = [t if s == "ok" else None for t, s in zip(texts, status, strict=True)]
        extra, summary = self.evaluate(rows, outputs, aligned)
        table = pa.table({"custom_id": ids, "status": status, **{c: aligned[c] for c in RESULT_COLUMNS[1:]}})
        for name, values in extra.items():
            table = table.append_column(name, pa.array(values))
        return table, {**common_summary(self.name, table), **summary}

    def rows_table(self, source: Source | None, schema: pa.Schema) -> pa.Table:
        wanted = list(dict.fromkeys(self.score_columns(schema) + self.template_columns(schema)))
        require_columns(schema, wanted)
        if "custom_id" in schema.names:
            wanted.append("custom_id")
        return read_table(source, columns=wanted)

    def template_columns(self, schema: pa.Schema) -> list[str]:
        return [f for f in self.prompt_template.fields if f in schema.names and f not in self.provides]


def align_results(ids: pa.Array | pa.ChunkedArray, results: pa.Table) -> pa.Table:
    """`results` reordered to match `ids` (first result wins on duplicates), null rows where none."""
    require_columns(results.schema, ["custom_id", "text"], what="result column")
    for name in RESULT_COLUMNS:
        if name not in results.column_names:
            kind = pa.int64() if name.endswith("_tokens") else pa.string()
            results = results.append_column(name, pa.nulls(results.num_rows, kind))
    results = results.select(list(RESULT_COLUMNS))
    # ids may come back as large_string (Parquet written elsewhere); index_in needs equal types
    results = results.set_column(0, "custom_id", results["custom_id"].cast(pa.string()))
    positions = pc.index_in(ids, value_set=results["custom_id"])
    return results.take(positions)


def common_summary(kind: str, table: pa.Table) -> dict:
    """Counts and token means every kind reports."""
    status = table["status"].to_pylist()
    ok = [i for i, s in enumerate(status) if s == "ok"]
    finish = table["finish_reason"].to_pylist()
    prompt_column, completion_column = (
        table["prompt_tokens"].to_pylist(),
        table["completion_tokens"].to_pylist(),
    )
    prompt_tokens = [prompt_column[i] for i in ok if prompt_column[i] is not None]
    completion_tokens = [completion_column[i] for i in ok if completion_column[i] is not None]
    return {
        "kind": kind,
        "requests": len(status),
        "ok": len(ok),
        "errors": status.count("error"),
        "missing": status.count("missing"),
        "truncated": sum(1 for i in ok if finish[i] == "length"),
        "mean_prompt_tokens": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        "mean_completion_tokens": statistics.fmean(completion_tokens) if completion_tokens else None,
    }
