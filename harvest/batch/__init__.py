"""The OpenAI Files and Batches API over the job queue: file bytes in a FileStore, file and
batch records in the job store's Redis, every batch a harvest job (see docs/QUEUE.md)."""

from harvest.batch.batches import BatchRegistry, BatchView
from harvest.batch.files import DEFAULT_MAX_FILE_BYTES, FileRecord, FileRegistry, FileTooLarge
from harvest.batch.filestore import FileStore
from harvest.batch.service import BatchService

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "BatchRegistry",
    "BatchService",
    "BatchView",
    "FileRecord",
    "FileRegistry",
    "FileStore",
    "FileTooLarge",
]
