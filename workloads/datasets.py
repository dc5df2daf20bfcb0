"""Reading workload datasets (Parquet, CSV, JSONL, optionally gzipped) as streams of record batches.

Every reader here is incremental, so a multi-gigabyte input is never loaded whole: Parquet by row
group, CSV and JSONL block by block. In-memory tables and lists of dicts are accepted too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

Source = str | Path | pa.Table | pa.RecordBatch | list[dict]

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
COMPRESSIONS = {".gz", ".bz2", ".zst", ".lz4"}
BLOCK_BYTES = 1 << 20


def detect_format(path: str | Path) -> str:
    """'parquet', 'csv' or 'jsonl' from the file name, looking through a compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    if suffixes and suffixes[-1] in FORMATS:
        return FORMATS[suffixes[-1]]
    raise ValueError(f"{path}: unknown dataset format; use one of {', '.join(sorted(FORMATS))}")


def open_batches(source: Source, batch_size: int = 1024) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema (known before any row is read) and a lazy iterator over the record batches."""
    if isinstance(source, list):
        source = pa.Table.from_pylist(source)
    if isinstance(source, pa.RecordBatch):
        source = pa.Table.from_batches([source])
    if isinstance(source, pa.Table):
        return source.schema, iter(source.to_batches(max_chunksize=batch_size))
    path = Path(source)
    fmt = detect_format(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if fmt == "parquet":
        parquet = pq.ParquetFile(path)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=batch_size)
    # input_stream picks the decompressor from the suffix
    stream = pa.input_stream(str(path), compression="detect")
    if fmt == "csv":
        reader = pa_csv.open_csv(stream, read_options=pa_csv.ReadOptions(block_size=BLOCK_BYTES))
    else:
        reader = pa_json.open_json(stream, read_options=pa_json.ReadOptions(block_size=BLOCK_BYTES))
    return reader.schema, _rebatched(reader, batch_size)


def _rebatched(reader, batch_size: int) -> Iterator[pa.RecordBatch]:
    # CSV/JSON readers yield one batch per block (often tens of thousands of rows); cap the size so
    # callers see the same granularity whatever the format
    for batch in reader:
        yield from pa.Table.from_batches([batch]).to_batches(max_chunksize=batch_size)


def read_table(source: Source, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset as one table (only `columns`, when given: Parquet then reads just those)."""
    if isinstance(source, str | Path) and detect_format(source) == "parquet":
        return pq.read_table(source, columns=columns)
    schema, batches = open_batches(source)
    table = pa.Table.from_batches(list(batches), schema=schema)
    if columns is not None:
        require_columns(table.schema, columns)
        table = table.select(columns)
    return table


def require_columns(schema: pa.Schema, columns: list[str], what: str = "column") -> None:
    """ValueError naming every missing column and listing the ones that exist."""
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise ValueError(
            f"dataset has no {what} {', '.join(repr(m) for m in missing)}; "
            f"its columns are: {', '.join(schema.names) or '(none)'}"
        )
