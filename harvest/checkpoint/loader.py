"""Restores off the step: a checkpoint comes back into a request's blocks while steps go on.

The scheduler gives a request that resumes from a checkpoint its blocks and parks it in the
LOADING state; the loader's thread adopts the checkpoint when it is another engine's (a
remote keeper: seconds at worst, bounded by the store's timeout), reads it and copies it into
those blocks; the engine polls for finished loads between steps and lets the request join a
batch only then (vLLM's WAITING_FOR_REMOTE_KVS). On CUDA the host-to-device copy runs on a
side stream that first waits for the compute stream's work on those blocks, and a load is
finished when its event has fired. On the CPU the thread only adopts, and the step thread
reads and copies when it polls (a memory copy of a few MB at most): a torch op big enough to
go parallel on a second thread starts a second OpenMP team, and with it alive every later
step ran 1.7x slower on the coserve bench.

A load that finds less than it was promised (a keeper gone with its node, a store that
fails) copies what there is: the request recomputes the rest, exactly.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from harvest.checkpoint.handle import CheckpointHandle
from harvest.checkpoint.store import CheckpointStore

if TYPE_CHECKING:  # the engine imports this package, not the reverse
    from harvest.engine.request import Request

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Load:
    """One restore. Blocks `first_block .. num_blocks - 1` of `block_ids` are written; the
    ones before came from the prefix cache, may be shared, and are never written."""

    request: Request
    key: str
    first_block: int
    num_blocks: int
    block_ids: list[int]
    handle: CheckpointHandle | None  # another engine's checkpoint, adopted under `key` first
    ready: object = None  # CUDA: the compute stream's event at submit; the copy waits for it
    # written by the loader thread, read by the step thread once the load is finished
    stored: int = 0  # leading blocks the store held for `key`
    copied: bool = False  # blocks first_block..min(num_blocks, stored) hold the checkpoint
    event: object = None  # CUDA: fires when the copy is done
    host: torch.Tensor | None = field(default=None, repr=False)  # kept alive for the async copy
    # set by the step thread under the loader's lock
    cancelled: bool = False
    drop: bool = False  # the request ended: whatever the adoption brought is dropped

    @property
    def loaded_blocks(self) -> int:
        """Leading blocks of the request that now hold its KV (the cached prefix included)."""
        return max(self.first_block, min(self.num_blocks, self.stored)) if self.copied else self.first_block


class CheckpointLoader:
    """Runs loads on one thread, in submission order, and hands finished ones back.

    `inline`: do the thread's part of each load in `submit`, on the caller's thread. The
    simulated device in virtual time wants that: its steps take no wall time, so a load on a
    thread finishes a step earlier or later from run to run, and the same trace gave different
    preemptions and restores each time; there is no device copy to overlap anyway."""

    def __init__(
        self, kv_cache: torch.Tensor, block_size: int, store: CheckpointStore, inline: bool = False
    ) -> None:
        layers, two, slots, kv_heads, head_dim = kv_cache.shape
        self.blocks_view = kv_cache.view(layers, two, slots // block_size, block_size, kv_heads, head_dim)
        self.store = store
        self.cuda = kv_cache.is_cuda
        self.stream = torch.cuda.Stream(kv_cache.device) if self.cuda else None
        self._pending: dict[str, Load] = {}  # by request id: submitted, not yet handed back (step thread)
        self._inbox: queue.SimpleQueue[Load] = queue.SimpleQueue()
        self._done: list[Load] = []  # finished by the thread, not yet polled
        self._unfinished = 0  # submitted, not yet finished by the thread (under _cond)
        self._cond = threading.Condition()
        # held while a copy is written: a cancel that got it knows no copy is under way
        self._copying = threading.Lock()
        self._thread: threading.Thread | None = None
        self.inline = inline

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def submit(
        self, req: Request, first_block: int, num_blocks: int, handle: CheckpointHandle | None
    ) -> None:
        """Start restoring `req`'s checkpoint into its blocks `first_block .. num_blocks - 1`."""
        blocks = list(req.block_table[:num_blocks])  # the loader thread never reads the request
        load = Load(req, req.request_id, first_block, num_blocks, blocks, handle)
        if self.cuda:  # the blocks' previous holders are done with them once this fires
            load.ready = torch.cuda.Event()
            load.ready.record(torch.cuda.current_stream(self.blocks_view.device))
        self._pending[load.key] = load
        with self._cond:
            self._unfinished += 1
        if self.inline:
            self._serve(load)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-loader", daemon=True)
            self._thread.start()
        self._inbox.put(load)

    def poll(self) -> list[Load]:
        """Loads finished since the last poll (cancelled ones are not handed back)."""
        with self._cond:
            done, self._done = self._done, []
        finished = []
        for load in done:
            if not self.cuda:
                self._fill(load)  # see the module's docstring
            if load.cancelled:
                continue
            if load.event is not None and not load.event.query():
                with self._cond:
                    self._done.append(load)  # copy still on the side stream
                continue
            self._pending.pop(load.key, None)
            load.host = None
            finished.append(load)
        return finished

    def wait(self, timeout_s: float) -> None:
        """Block until some load finishes or `timeout_s` passes (for a step with nothing else to do)."""
        with self._cond:
            if not self._done:
                self._cond.wait(timeout_s)
            events = [load.event for load in self._done if load.event is not None]
        for event in events:  # CUDA: a copy still on the side stream is what there is to wait for
            event.synchronize()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Block until the thread has finished every load submitted so far (and, on CUDA, their
        copies are done): a test that needs the same steps on every run calls it before each."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._unfinished, timeout_s):
                raise TimeoutError(f"checkpoint loads still running after {timeout_s} s")
            events = [load.event for load in self._done if load.event is not None]
        for event in events:
            event.synchronize()

    def cancel(self, req: Request, drop: bool = False) -> None:
        """Stop `req`'s load; afterwards its blocks may be freed and handed to anyone.

        A copy not yet begun never begins; one that began has finished on CPU (it ran under
        the lock taken here) or, on CUDA, is enqueued on the side stream, and the compute
        stream waits for it before anything it runs next can touch those blocks."""
        load = self._pending.pop(req.request_id, None)
        if load is None:
            return
        with self._copying:
            load.cancelled, load.drop = True, drop
        if load.event is not None:
            torch.cuda.current_stream(self.blocks_view.device).wait_event(load.event)

    # ------------------------------------------------------------------ the loader thread

    def _run(self) -> None:
        while True:
            self._serve(self._inbox.get())

    def _serve(self, load: Load) -> None:
        try:
            self._load(load)
        except Exception:  # the thread serves every later load: a bug here costs one recompute
            log.exception("checkpoint load of %s failed: it recomputes", load.key)
        with self._cond:
            self._done.append(load)
            self._unfinished -= 1
            self._cond.notify_all()

    def _load(self, load: Load) -> None:
        if not load.cancelled and load.handle is not None:
            try:
                self.store.adopt(load.handle, load.key)
            except Exception:
                log.exception("checkpoint of %s could not be adopted: it recomputes", load.key)
        if self.cuda:
            self._fill(load)
            return
        with self._copying:  # the step thread fills it when it polls, unless it was cancelled
            if load.cancelled and load.drop:  # an adoption that landed after the request ended
                with contextlib.suppress(Exception):
                    self.store.drop(load.key)

    def _fill(self, load: Load) -> None:
        """Read the checkpoint and copy it into the load's blocks (or drop what a cancelled
        load adopted)."""
        data = None
        if not load.cancelled:
            try:
                data = self.store.get(load.key)
            except Exception:
                log.exception("checkpoint of %s could not be read: it recomputes", load.key)
        with self._copying:
            if load.cancelled:
                if load.drop:  # an adoption that landed after the request ended
                    with contextlib.suppress(Exception):
                        self.store.drop(load.key)
                return
            load.stored = 0 if data is None else data.shape[2]
            first, end = load.first_block, min(load.num_blocks, load.stored)
            try:
                if end > first:
                    self._copy(load, data[:, :, first:end], load.block_ids[first:end])
                load.copied = True
            except Exception:
                log.exception("checkpoint of %s could not be copied back: it recomputes", load.key)

    def _copy(self, load: Load, data: torch.Tensor, block_ids: list[int]) -> None:
        if not self.cuda:
            index = torch.tensor(block_ids, device=self.blocks_view.device)
            self.blocks_view.index_copy_(2, index, data.to(self.blocks_view.dtype))
            return
        device = self.blocks_view.device
        host = data.contiguous().pin_memory()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(load.ready)
            index = torch.tensor(block_ids, device="cpu").pin_memory().to(device, non_blocking=True)
            chunk = host.to(device, non_blocking=True)
            self.blocks_view.index_copy_(2, index, chunk.to(self.blocks_view.dtype))
            load.event = torch.cuda.Event()
            load.event.record(self.stream)
        load.host = host  # the pinned source must outlive the copy
