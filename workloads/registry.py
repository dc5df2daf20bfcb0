"""The workload kinds by name, and the two calls a front end needs: build requests, score results.

    harvest submit --workload summarize docs.parquet --column text
        -> build_requests("summarize", "docs.parquet", model=..., column="text")
    harvest results JOB --workload summarize --dataset docs.parquet
        -> score("summarize", "docs.parquet", results_table)

Options arriving as strings (from a command line) are converted to the type of the option's default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from workloads.classify import Classify
from workloads.datasets import Source
from workloads.kinds import WorkloadKind
from workloads.mc_eval import MultipleChoiceEval
from workloads.summarize import Summarize
from workloads.synthetic import Synthetic

KINDS: dict[str, type[WorkloadKind]] = {
    kind.name: kind for kind in (Summarize, MultipleChoiceEval, Classify, Synthetic)
}
DATA_DIR = Path(__file__).parent / "data"
SAMPLES = {
    "summarize": "summarize_docs.jsonl",
    "mc_eval": "mc_questions.jsonl",
    "classify": "classify_tickets.csv",
}


def workload_names() -> list[str]:
    return list(KINDS)


def sample_dataset(kind: str) -> Path | None:
    """The bundled sample dataset for a kind (None for synthetic, which needs none)."""
    kind_class(kind)
    return DATA_DIR / SAMPLES[kind] if kind in SAMPLES else None


def kind_options(kind: str) -> dict[str, Any]:
    """Option name -> default for one kind (column, template and max_tokens included)."""
    cls = kind_class(kind)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def kind_class(kind: str) -> type[WorkloadKind]:
    if kind not in KINDS:
        raise ValueError(f"unknown workload {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind]


def make_kind(kind: str, **options: Any) -> WorkloadKind:
    """A configured workload kind; ValueError on an unknown kind or option, or a bad value."""
    defaults = kind_options(kind)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"workload {kind!r} has no option {', '.join(unknown)}; its options: {', '.join(defaults)}"
        )
    converted = {
        name: coerce(name, value, defaults[name]) for name, value in options.items() if value is not None
    }
    return kind_class(kind)(**converted)


def coerce(name: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    target = int if name == "max_tokens" else type(default)
    try:
        if target is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if target is tuple:
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if target in (int, float):
            return target(value)
    except ValueError:
        raise ValueError(f"option {name}={value!r}: expected {target.__name__}") from None
    return value


def build_requests(
    kind: str,
    source: Source | None = None,
    *,
    model: str,
    column: str | None = None,
    max_tokens: int | None = None,
    template: str | None = None,
    chat: bool = False,
    **options: Any,
) -> Iterator[dict]:
    """OpenAI Batch API request lines for a dataset, one per row, custom_id '<kind>-<row>'.

    Rows are read as the iterator is consumed, but a missing column or an unknown template field
    raises ValueError here, before the first request.
    """
    workload = make_kind(kind, column=column, max_tokens=max_tokens, template=template, **options)
    return workload.requests(source, model=model, chat=chat)


def score(
    kind: str,
    dataset: Source | None,
    results: pa.Table | Source,
    *,
    column: str | None = None,
    **options: Any,
) -> tuple[pa.Table, dict]:
    """Join results (custom_id, text, finish_reason, token counts, error) to the dataset the requests
    were built from and score them: a per-row table in dataset order and a JSON-able summary.

    `dataset` must be the same rows, in the same order, as given to `build_requests` (or carry a
    custom_id column); pass the same options.
    """
    return make_kind(kind, column=column, **options).score(dataset, results)


def write_jsonl(requests: Iterable[dict], path: str | Path) -> int:
    """Write request lines as an OpenAI Batch input file; returns how many were written."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for line in requests:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
    return count
