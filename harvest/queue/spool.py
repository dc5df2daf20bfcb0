"""Spool: records written once, then read back in any order, from a temporary file.

A submission placed by prompt writes its shards in another order than it reads its input,
and an export of such a job reads its results in another order than it writes its rows; a
spool keeps either off the heap, holding one offset per record.
"""

from __future__ import annotations

import tempfile
from array import array


class Spool:
    """Append every record, then read them back by number (appending after a read is refused:
    neither use needs it, and it keeps the file's buffer simple)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115  (gone when closed, or when the process dies)
        self._ends = array("q")
        self._reading = False

    def append(self, record: bytes) -> int:
        """Store `record`; returns its number."""
        assert not self._reading, "a spool is written, then read"
        self._file.write(record)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(record))
        return len(self._ends) - 1

    def __getitem__(self, number: int) -> bytes:
        if not self._reading:
            self._file.flush()
            self._reading = True
        start = self._ends[number - 1] if number else 0
        self._file.seek(start)
        return self._file.read(self._ends[number] - start)

    def __len__(self) -> int:
        return len(self._ends)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
