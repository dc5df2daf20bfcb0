"""Where checkpointed KV blocks live: the store protocol and the in-memory host store."""

from __future__ import annotations

from typing import Protocol

import torch

from harvest.checkpoint.handle import CheckpointHandle


class CheckpointStore(Protocol):
    """Where checkpointed KV blocks live. Chunks arrive in block order, per request.

    A chunk is a tensor [layers, 2, n_blocks, block_size, kv_heads, head_dim] holding the
    request's blocks `first_block .. first_block + n_blocks - 1`. `name` goes into the
    handles of this store's checkpoints (`CheckpointHandle.store`).

    `adopt` may be slow (another node's keeper) and runs on the engine's loader thread, never
    on the step or the queue's thread; it gives up within its store's timeout, and a
    checkpoint it cannot reach costs a recompute, never a wrong result. Adopting the same
    handle twice is harmless: the second finds the source gone and keeps what `key` holds.
    """

    name: str

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None: ...

    # all blocks from 0, concatenated; a local read (it may run on the step thread): what is
    # slow (another node's keeper) is `adopt`'s, which runs on the loader's thread
    def get(self, key: str) -> torch.Tensor | None: ...

    def num_blocks(self, key: str) -> int: ...

    def drop(self, key: str) -> None: ...

    def adopt(self, handle: CheckpointHandle, key: str) -> int: ...  # move it under `key`; its blocks


class HostCheckpointStore:
    """An in-memory host store: the engine's own, and the one engine tests share."""

    name = "host"

    def __init__(self) -> None:
        self._chunks: dict[str, list[torch.Tensor]] = {}

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None:
        chunks = self._chunks.setdefault(key, [])
        held = sum(c.shape[2] for c in chunks)
        if first_block > held:
            raise ValueError(f"checkpoint {key!r}: chunk at block {first_block} is out of order")
        if first_block < held:
            # a request that adopted this checkpoint trusts fewer blocks than it holds (its
            # handle lagged the store) and saves again from there: the new chunk supersedes
            chunks[:] = _first_blocks(chunks, first_block)
        chunks.append(chunk)

    def get(self, key: str) -> torch.Tensor | None:
        chunks = self._chunks.get(key)
        return torch.cat(chunks, dim=2) if chunks else None

    def num_blocks(self, key: str) -> int:
        return sum(c.shape[2] for c in self._chunks.get(key, []))

    def drop(self, key: str) -> None:
        self._chunks.pop(key, None)

    def adopt(self, handle: CheckpointHandle, key: str) -> int:
        if handle.store == self.name and (chunks := self._chunks.pop(handle.key, None)) is not None:
            self._chunks[key] = chunks
        return self.num_blocks(key)

    def __len__(self) -> int:
        return len(self._chunks)


def _first_blocks(chunks: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The chunks that hold blocks 0 .. n-1, the last one cut at block n."""
    kept, held = [], 0
    for chunk in chunks:
        if held >= n:
            break
        kept.append(chunk if held + chunk.shape[2] <= n else chunk[:, :, : n - held])
        held += kept[-1].shape[2]
    return kept
