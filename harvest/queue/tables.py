"""Table inputs (Parquet, CSV, JSONL rows) read in record batches through pyarrow.

A prompt comes from one column, optionally through a template such as
`"Summarise:\n{text}"` whose fields name columns. Only the columns the prompt and id
need are read, one batch at a time, so a large table never sits in memory whole.

Prompt columns must hold strings: a number or a list is refused naming the column and
its type (per row in JSONL, for the whole column in Parquet), never `str()`-ed into a
prompt. An id column may hold integers. Every error names its line or row, CSV parse
errors included; the prompt itself goes through the same translator as a batch line.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from harvest.queue.errors import InvalidInputError
from harvest.queue.inputs import (
    CHAT,
    COMPLETIONS,
    BadRequest,
    InputError,
    RequestSpec,
    check_custom_id,
    job_defaults,
    parse_json,
    spec_from_body,
)

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
    """The columns `template` names; InvalidInputError (the whole input) for anything but
    plain `{column}` fields: a format spec or conversion (`{text:d}`, `{text!r}`) would
    fail or `repr()` a row, a positional field (`{0}`, `{}`) names no column. Submitters
    call it before reading any row."""
    try:
        parsed = [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        raise _whole_input_error(f"bad prompt template {template!r}: {exc}") from None
    for name, spec, conversion in parsed:
        if not name or not name.isidentifier():  # `{}`, `{0}`, `{a.b}`, `{a[0]}`
            raise _whole_input_error(
                f"bad prompt template {template!r}: field {{{name}}} must name a column, like {{text}}"
            )
        if spec or conversion:
            raise _whole_input_error(
                f"bad prompt template {template!r}: field {{{name}}} takes no format spec or conversion; "
                f"use {{{name}}}"
            )
    return [name for name, _, _ in parsed]


def _whole_input_error(reason: str) -> InvalidInputError:
    return InvalidInputError([InputError(0, reason)])


def _rows(path: Path, fmt: str, columns: list[str], text_columns: list[str]) -> Iterator[tuple[int, Any]]:
    """(line or row number, row restricted to `columns`, or a BadRequest for that row)."""
    if fmt == "parquet":
        yield from _parquet_rows(path, columns, text_columns)
    elif fmt == "csv":
        yield from _csv_rows(path, columns)
    else:
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        yield line, parse_json(raw)
                    except BadRequest as exc:
                        yield line, exc


def _parquet_rows(path: Path, columns: list[str], text_columns: list[str]) -> Iterator[tuple[int, Any]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _whole_input_error(f"cannot read {path.name} as Parquet: {exc}") from None
    schema = pf.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise _whole_input_error(f"no column(s) {missing} in {path.name}; it has {schema.names}")
    for c in text_columns:
        if not _is_text(schema.field(c).type):
            raise _whole_input_error(
                f"column {c!r} in {path.name} has type {schema.field(c).type}; prompt columns must be strings"
            )
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _csv_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """Rows by line number (the header is line 1; as Arrow counts, a quoted value spanning
    lines is one). A row that does not parse (wrong number of fields) is that line's error;
    any other parse failure (bad UTF-8) ends the file with an error after the last good
    line, since the reader cannot go on past it."""
    bad: list[tuple[int | None, str]] = []

    def on_invalid_row(row: Any) -> str:
        bad.append(
            (
                row.number,
                f"cannot parse CSV row: expected {row.expected_columns} fields, "
                f"got {row.actual_columns}: {row.text[:80]!r}",
            )
        )
        return "skip"

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        reader = pcsv.open_csv(
            path,
            # one thread: the row handler then gets each bad row's line number
            read_options=pcsv.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid_row),
            convert_options=pcsv.ConvertOptions(column_types={c: "string" for c in columns}),
        )
    except (pa.ArrowException, OSError) as exc:  # the first block did not parse
        line = _first_non_utf8_line(path)
        where = f" (line {line} is not UTF-8)" if line else ""
        raise InvalidInputError(
            [InputError(line or 0, f"cannot read {path.name} as CSV{where}: {exc}")]
        ) from None
    missing = [c for c in columns if c not in reader.schema.names]
    if missing:
        raise _whole_input_error(f"no column(s) {missing} in {path.name}; it has {reader.schema.names}")
    line = 1  # the header
    skipped: dict[int, str] = {}  # line -> reason, for bad rows not yet yielded
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as exc:
            bad_line = _first_non_utf8_line(path) or line + 1
            yield bad_line, BadRequest(f"cannot read {path.name} past line {line}: {exc}")
            return
        # the handler saw this block's bad rows before the block came back: yield every row
        # in file order, so that `row-{n}` ids stay the n-th data row
        skipped.update((number or line + 1, reason) for number, reason in bad)
        bad.clear()
        for record in batch.select(columns).to_pylist():
            line += 1
            while line in skipped:
                yield line, BadRequest(skipped.pop(line))
                line += 1
            yield line, record
        while line + 1 in skipped:
            line += 1
            yield line, BadRequest(skipped.pop(line))
    for number in sorted(skipped):
        yield number, BadRequest(skipped[number])


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
    text_columns = fields if template is not None else [column]
    columns = list(dict.fromkeys([c for c in (column, *fields, id_column) if c]))
    try:
        params = job_defaults(defaults)
    except BadRequest as exc:
        raise _whole_input_error(str(exc)) from None
    for n, (line, row) in enumerate(_rows(path, fmt, columns, text_columns)):
        try:
            spec = _row_request(row, n, column, template, text_columns, id_column, params, chat)
        except BadRequest as exc:
            yield line, InputError(line, str(exc), None, unit)
            continue
        yield line, spec


def _first_non_utf8_line(path: Path) -> int | None:
    """The line Arrow's "invalid UTF8" error is about (it names only the column)."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line
    return None


def _row_request(
    row: Any,
    n: int,
    column: str | None,
    template: str | None,
    text_columns: list[str],
    id_column: str | None,
    params: dict[str, Any],
    chat: bool,
) -> RequestSpec:
    if isinstance(row, BadRequest):
        raise row
    if not isinstance(row, dict):
        raise BadRequest("expected a JSON object per line")
    for c in (column, id_column, *text_columns):
        if c and row.get(c) is None:
            raise BadRequest(f"column {c!r} is missing or null")
    for c in text_columns:
        if not isinstance(row[c], str):
            raise BadRequest(f"column {c!r} holds {type(row[c]).__name__} {_short(row[c])}, not a string")
    prompt = template.format_map(row) if template is not None else row[column]
    if not prompt:
        raise BadRequest(f"empty prompt from column {column!r}")
    custom_id = check_custom_id(str(row[id_column])) if id_column else f"row-{n}"
    if chat:
        return spec_from_body(custom_id, CHAT, {"messages": [{"role": "user", "content": prompt}]}, params)
    return spec_from_body(custom_id, COMPLETIONS, {"prompt": prompt}, params)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
