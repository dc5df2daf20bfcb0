"""FileStore: where the bytes of uploaded and harvest-written files live.

A local directory by default, any `pyarrow.fs` URI (`s3://bucket/prefix`, `gs://...`,
`file:///shared/dir`) on a cluster, so that every API replica reads what another wrote.
Four verbs: `put` a stream of chunks, `open` for reading, `delete`, `size`. pyarrow.fs
does the talking to each backend; this class only keeps every key under one base path.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from harvest.paths import data_dir

READ_CHUNK = 1 << 20
WRITE_BUFFER = 1 << 20  # output files are written a line at a time


def default_files_dir() -> Path:
    return data_dir() / "files"


class FileStore:
    """Keys (flat names such as `file-abc.jsonl`) under one directory of one filesystem."""

    def __init__(self, location: str | Path | None = None) -> None:
        location = str(location or default_files_dir())
        if "://" in location:
            self.fs, base = pafs.FileSystem.from_uri(location)
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(location).resolve())
        self.base = base.rstrip("/")
        self.location = location
        self.fs.create_dir(self.base, recursive=True)

    def _path(self, key: str) -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad file store key {key!r}")
        return f"{self.base}/{key}"

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write `chunks` to `key` as they come; returns the byte count. Whatever stops the
        write midway (an exception from `chunks` included) leaves no object behind."""
        path, written = self._path(key), 0
        try:
            with self.fs.open_output_stream(path) as out:
                for chunk in chunks:
                    out.write(chunk)
                    written += len(chunk)
        except BaseException:
            self.delete(key)
            raise
        return written

    def writer(self, key: str) -> pafs.NativeFile:
        """An open output stream for `key`, for writers that produce bytes in a loop of their own;
        the caller closes it, or deletes the key when it gives up."""
        return self.fs.open_output_stream(self._path(key), buffer_size=WRITE_BUFFER)

    def open(self, key: str) -> BinaryIO:
        return self.fs.open_input_stream(self._path(key))

    def iter_bytes(self, key: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        with self.open(key) as f:
            while data := f.read(chunk):
                yield data

    def delete(self, key: str) -> None:
        """Idempotent: a key that is not there is already deleted."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(key))

    def size(self, key: str) -> int | None:
        info = self.fs.get_file_info(self._path(key))
        return info.size if info.type == pafs.FileType.File else None

    @contextlib.contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A path on this machine holding `key`'s bytes: the file itself on a local store, else
        a temporary copy (streamed down, removed afterwards), for readers that open paths."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            yield Path(self._path(key))
            return
        with tempfile.TemporaryDirectory(prefix="harvest-file-") as tmp:
            path = Path(tmp) / key
            with self.open(key) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, READ_CHUNK)
            yield path
