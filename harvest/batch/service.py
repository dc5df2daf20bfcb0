"""BatchService: what the HTTP app needs to serve Files and Batches, connected on first use.

Built where the app is built (tests, `harvest up`'s worker application) and shipped with
it to Serve replicas, so it holds only settings until a route asks for its registries:
a Redis client does not survive pickling, and each replica needs its own.
"""

from __future__ import annotations

import threading
from pathlib import Path

from harvest.batch.batches import BatchRegistry
from harvest.batch.files import DEFAULT_MAX_FILE_BYTES, FileRegistry
from harvest.batch.filestore import FileStore
from harvest.queue.store import JobStore

MULTIPART_SLACK_BYTES = 64 << 10  # part headers and boundaries around the file's own bytes
MIN_WINDOW_S = 5 * 60  # a shorter window leaves no room to queue, lease and run
MAX_WINDOW_S = 7 * 86400  # the job TTL's default: a batch never outlives its own record


class BatchService:
    """The job store at `redis_url` and the file store at `files` (a directory or a pyarrow.fs
    URI; default: the harvest data dir's `files/`); batches may ask for completion windows from
    `min_window_s` to `max_window_s`."""

    def __init__(
        self,
        redis_url: str,
        files: str | Path | None = None,
        prefix: str = "harvest",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        min_window_s: float = MIN_WINDOW_S,
        max_window_s: float = MAX_WINDOW_S,
    ) -> None:
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
        if not 0 < min_window_s <= max_window_s:
            raise ValueError(f"need 0 < min_window_s <= max_window_s, got {min_window_s}, {max_window_s}")
        self.min_window_s = min_window_s
        self.max_window_s = max_window_s
        self.redis_url = redis_url
        self.files_location = files
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self._registries: tuple[FileRegistry, BatchRegistry] | None = None
        self._lock = threading.Lock()

    @property
    def max_upload_bytes(self) -> int:
        """The body cap for POST /v1/files: the file limit plus room for the multipart framing."""
        return self.max_file_bytes + MULTIPART_SLACK_BYTES

    def _connect(self) -> tuple[FileRegistry, BatchRegistry]:
        with self._lock:  # routes call in from worker threads
            if self._registries is None:
                store = JobStore.from_url(self.redis_url, self.prefix)
                file_store = FileStore(self.files_location)
                files = FileRegistry(store.r, file_store, self.prefix, self.max_file_bytes)
                self._registries = files, BatchRegistry(store, files)
            return self._registries

    @property
    def files(self) -> FileRegistry:
        return self._connect()[0]

    @property
    def batches(self) -> BatchRegistry:
        return self._connect()[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_registries": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
