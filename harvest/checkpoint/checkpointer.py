"""Incremental KV checkpointing: full blocks of offline sequences are copied aside as they fill.

When an offline sequence is evicted, only the tokens after its last checkpointed block
are lost; on resume (here or on another engine sharing the store) the loader copies the
checkpointed blocks back into fresh blocks and only that short tail is recomputed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from harvest.checkpoint.store import CheckpointStore

if TYPE_CHECKING:  # the engine imports this package, not the reverse
    from harvest.engine.request import Request

log = logging.getLogger(__name__)


class Checkpointer:
    """Copies newly filled blocks of a request from the KV pool into a `CheckpointStore`.

    On CUDA the device-to-host copy runs on a side stream into pinned memory, so it never
    blocks the compute stream; a copy counts as checkpointed once its event has fired.
    A store that fails costs the request its checkpoint (preempted, it recomputes), never
    the engine: checkpoints only save work, and the step loop also serves online traffic.
    """

    def __init__(self, kv_cache: torch.Tensor, block_size: int, store: CheckpointStore) -> None:
        layers, two, slots, kv_heads, head_dim = kv_cache.shape
        self.blocks_view = kv_cache.view(layers, two, slots // block_size, block_size, kv_heads, head_dim)
        self.block_size = block_size
        self.store = store
        self.cuda = kv_cache.is_cuda
        self.stream = torch.cuda.Stream(kv_cache.device) if self.cuda else None
        self._pending: list[tuple[Request, int, torch.Tensor, torch.Tensor, object]] = []
        self._failed: set[str] = set()  # requests whose checkpoint the store lost: not saved again

    def save(self, req: Request) -> int:
        """Checkpoint the request's blocks that are full and not yet saved; returns how many."""
        done = req.checkpointed_tokens // self.block_size + sum(p[1] for p in self._pending if p[0] is req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_table))
        if full <= done or req.request_id in self._failed:
            return 0
        index = torch.tensor(req.block_table[done:full], device=self.blocks_view.device)
        chunk = self.blocks_view.index_select(2, index)  # device copy, ordered on the compute stream
        if not self.cuda:
            if not self._put(req, done, chunk):
                return 0
            req.checkpointed_tokens = full * self.block_size
            return full - done
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
            host.copy_(chunk, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        chunk.record_stream(self.stream)
        self._pending.append((req, full - done, host, chunk, event))
        return full - done

    def poll(self, wait: bool = False) -> list[Request]:
        """Hand finished copies to the store (all of them, in order, when `wait`); returns
        the requests whose checkpoints moved (saved further, or lost)."""
        still, landed = [], []
        for req, n, host, chunk, event in self._pending:
            if still or not (wait or event.query()):
                still.append((req, n, host, chunk, event))
                continue
            event.synchronize()
            landed.append(req)
            if req.request_id not in self._failed and self._put(
                req, req.checkpointed_tokens // self.block_size, host
            ):
                req.checkpointed_tokens += n * self.block_size
        self._pending = still
        return landed

    def _put(self, req: Request, first_block: int, chunk: torch.Tensor) -> bool:
        try:
            self.store.put(req.request_id, first_block, chunk)
            return True
        except Exception:
            log.exception("checkpoint store failed for %s: it goes on without a checkpoint", req.request_id)
        self._failed.add(req.request_id)
        req.checkpointed_tokens = 0
        with contextlib.suppress(Exception):
            self.store.drop(req.request_id)
        return False

    def drop(self, req: Request) -> None:
        self._pending = [p for p in self._pending if p[0] is not req]
        self._failed.discard(req.request_id)
        try:
            self.store.drop(req.request_id)
        except Exception:
            log.exception("checkpoint of %s could not be dropped", req.request_id)
