"""Table inputs (Parquet, CSV, JSONL rows) read in record batches through pyarrow.

A prompt comes from one column, optionally through a template such as
`"Summarise:\n{text}"` whose fields name columns. Only the columns the prompt and id
need are read, one batch at a time, so a large table never sits in memory whole.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from harvest.queue.errors import InvalidInputError
from harvest.queue.inputs import CHAT, COMPLETIONS, BadRequest, InputError, RequestSpec, sampling_from

BATCH_ROWS = 1024
PARQUET = (".parquet", ".pq")
CSV = (".csv", ".tsv")
JSONL = (".jsonl", ".ndjson", ".json")


def table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    for name, suffixes in (("parquet", PARQUET), ("csv", CSV), ("jsonl", JSONL)):
        if suffix in suffixes:
            return name
    raise InvalidInputError([InputError(0, f"unknown table type {suffix!r}; use .parquet, .csv or .jsonl")])


def template_fields(template: str) -> list[str]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InvalidInputError([InputError(0, f"bad prompt template: {exc}")]) from None
    if any(not f or not f.isidentifier() for f in fields):
        raise InvalidInputError([InputError(0, "prompt template fields must be column names like {text}")])
    return fields


def _whole_input_error(reason: str) -> InvalidInputError:
    return InvalidInputError([InputError(0, reason)])


def _rows(path: Path, fmt: str, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row restricted to `columns`)."""
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise _whole_input_error(f"no column(s) {missing} in {path.name}; it has {pf.schema_arrow.names}")
        row = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    elif fmt == "csv":
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=1 << 20),
            parse_options=pcsv.ParseOptions(delimiter=delimiter),
            convert_options=pcsv.ConvertOptions(column_types={c: "string" for c in columns}),
        )
        missing = [c for c in columns if c not in reader.schema.names]
        if missing:
            raise _whole_input_error(f"no column(s) {missing} in {path.name}; it has {reader.schema.names}")
        line = 1  # the header
        for batch in reader:
            for record in batch.select(columns).to_pylist():
                line += 1
                yield line, record
    else:
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        yield line, json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        yield line, {"__error__": f"malformed JSON: {exc}"}


def read_table(
    path: Path,
    column: str | None,
    template: str | None,
    defaults: dict[str, Any],
    id_column: str | None = None,
    chat: bool = False,
) -> Iterator[tuple[int, RequestSpec | InputError]]:
    """Rows -> requests. custom_id is `id_column`'s value, else `row-{n}` (n from 0)."""
    fmt = table_format(path)
    unit = "row" if fmt == "parquet" else "line"
    if column is None and template is None:
        raise _whole_input_error("a table needs a prompt column (--column) or a template")
    fields = template_fields(template) if template is not None else []
    columns = list(dict.fromkeys([c for c in (column, *fields, id_column) if c]))
    params = sampling_from({}, defaults)
    for n, (line, row) in enumerate(_rows(path, fmt, columns)):
        try:
            spec = _row_request(row, n, column, template, id_column, params, chat)
        except BadRequest as exc:
            yield line, InputError(line, str(exc), None, unit)
            continue
        yield line, spec


def _row_request(
    row: Any,
    n: int,
    column: str | None,
    template: str | None,
    id_column: str | None,
    params: dict[str, Any],
    chat: bool,
) -> RequestSpec:
    if not isinstance(row, dict):
        raise BadRequest("expected a JSON object per line")
    if "__error__" in row:
        raise BadRequest(row["__error__"])
    for c in (column, id_column):
        if c and row.get(c) is None:
            raise BadRequest(f"column {c!r} is missing or null")
    try:
        prompt = template.format_map(row) if template is not None else str(row[column])
    except KeyError as exc:
        raise BadRequest(f"template field {exc} is missing from the row") from None
    if not prompt:
        raise BadRequest(f"empty prompt from column {column!r}")
    custom_id = str(row[id_column]) if id_column else f"row-{n}"
    if chat:
        return RequestSpec(custom_id, CHAT, dict(params), messages=[{"role": "user", "content": prompt}])
    return RequestSpec(custom_id, COMPLETIONS, dict(params), prompt=prompt)
