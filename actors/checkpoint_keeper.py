"""KV checkpoints in the Ray object store that outlive the worker that made them.

An object in the object store dies with its owner, the process that created the ref, and
Ray 2.56 removed `ray.put(..., _owner=...)`. So workers do not `ray.put` their checkpoints:
they hand each chunk to the `CheckpointKeeper` of their node (a detached actor, one per
node), which re-puts it and holds the ref. A SIGKILLed worker loses nothing that reached
its keeper; a lost node loses its checkpoints, which costs a recompute from the token
ids recorded in Redis, never a wrong result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from harvest.checkpoint.handle import CheckpointHandle
from harvest.checkpoint.store import HostCheckpointStore
from harvest.names import NAMESPACE

# a closed key is remembered this long: past it no put for it can still be in flight (a
# worker ships every 0.25 s, and a stale lease holder learns it lost the lease at its next
# renewal, a third of the visibility timeout; a lease lost to expiry had a visibility
# timeout and an outage grace before that). Remembered forever, the set only grew: at 100
# offline requests/s (the soak benchmark's tiny jobs) 5 minutes of keys are about 6 MB.
CLOSED_TTL_S = 300.0
# how long an adoption waits for a keeper: past it the checkpoint counts as gone (a recompute)
ADOPT_TIMEOUT_S = 10.0


class CheckpointKeeper:
    """Holds the refs of checkpoint chunks, keyed by request and first block.

    Calls may run concurrently (a threaded actor), so chunks can arrive out of order; a
    checkpoint is the run of chunks contiguous from block 0, and a gap (a chunk lost with
    its worker) ends it. Chunks travel and rest as raw bytes in numpy arrays, which Ray
    moves without copies (a torch tensor went through torch.save: twice the cost here).
    """

    def __init__(
        self, closed_ttl_s: float = CLOSED_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.refs: dict[str, dict[int, tuple[int, ray.ObjectRef, str]]] = {}
        # moved or dropped -> when: a put still in flight must not revive them (oldest first)
        self.closed: dict[str, float] = {}
        self.closed_ttl_s = closed_ttl_s
        self.clock = clock
        self.bytes = 0

    def _close(self, key: str) -> None:
        now = self.clock()
        self.closed.pop(key, None)  # re-inserted at the end: the dict stays in closing order
        self.closed[key] = now
        while self.closed[oldest := next(iter(self.closed))] < now - self.closed_ttl_s:
            del self.closed[oldest]  # never the key just closed: the loop ends there

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None:
        self.put_many([(key, first_block, *_pack(chunk))])

    def put_many(self, chunks: list[tuple[str, int, np.ndarray, str]]) -> None:
        for key, first_block, data, dtype in chunks:
            if key in self.closed:
                continue
            self.refs.setdefault(key, {})[first_block] = (data.shape[2], ray.put(data), dtype)
            self.bytes += data.nbytes

    def _prefix(self, key: str) -> list[tuple[ray.ObjectRef, str]]:
        chunks, refs, block = self.refs.get(key, {}), [], 0
        while block in chunks:
            n, ref, dtype = chunks[block]
            refs.append((ref, dtype))
            block += n
        return refs

    def get(self, key: str) -> torch.Tensor | None:
        refs = self._prefix(key)
        if not refs:
            return None
        data = np.concatenate(ray.get([ref for ref, _ in refs]), axis=2)
        return _unpack(data, refs[0][1])

    def num_blocks(self, key: str) -> int:
        chunks, block = self.refs.get(key, {}), 0
        while block in chunks:
            block += chunks[block][0]
        return block

    def move(self, source: str, dest: str) -> int:
        """Hand `source`'s chunks to `dest` (refs only, no data copied); returns its blocks.
        A source already moved (a second adoption of one handle) leaves `dest` as it is."""
        if source in self.refs:
            self.refs[dest] = self.refs.pop(source)
        if source != dest:
            self._close(source)
        self.closed.pop(dest, None)
        return self.num_blocks(dest)

    def drop(self, key: str) -> None:
        self.refs.pop(key, None)  # the refs go out of scope: Ray frees the objects
        self._close(key)

    def drop_many(self, keys: list[str]) -> None:
        for key in keys:
            self.drop(key)

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self.refs),
            "chunks": sum(len(c) for c in self.refs.values()),
            "closed": len(self.closed),
            "bytes_put": self.bytes,
        }


def _pack(chunk: torch.Tensor) -> tuple[np.ndarray, str]:
    """A chunk's bytes as a numpy array (any dtype, bfloat16 too) and its dtype's name."""
    return chunk.contiguous().view(torch.uint8).numpy(), str(chunk.dtype).removeprefix("torch.")


def _unpack(data: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data)).view(getattr(torch, dtype))


def keeper_name(node_id: str) -> str:
    return f"harvest-ckpt-{node_id[:16]}"


def keeper_for_this_node() -> tuple[str, Any]:
    """The keeper of the node we run on, created on first use (detached, pinned to the node)."""
    return keeper_on(ray.get_runtime_context().get_node_id())


def keeper_on(node_id: str) -> tuple[str, Any]:
    """The keeper of node `node_id`, created on first use (detached, pinned to that node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = keeper_name(node_id)
    # no task events: every call would be kept in the GCS (up to 100,000 of them), and workers
    # call the keeper several times a second for as long as they run
    handle = (
        ray.remote(num_cpus=0, max_concurrency=64, enable_task_events=False)(CheckpointKeeper)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                 scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote()
    )  # fmt: skip
    return name, handle


class RayCheckpointStore(HostCheckpointStore):
    """The engine's `CheckpointStore`: a host copy here for this engine's own restores, and
    the node's keeper for whoever resumes the request after this worker dies.

    Restoring from the host copy costs a memory copy; from the object store it cost 26-290
    ms on the step loop here. `put` keeps the chunk and queues it; a background thread ships
    what queued up in one call every `ship_interval_s`, one request's consecutive chunks
    joined (a call per chunk had the keeper and the raylet use a quarter of a core here
    next to a backlog). A worker killed mid-interval loses that interval's blocks: a short
    recompute. The store's `name` is its keeper's, so another worker can adopt its handles.
    """

    def __init__(
        self, name: str, keeper: Any, ship_interval_s: float = 0.25, adopt_timeout_s: float = ADOPT_TIMEOUT_S
    ) -> None:
        super().__init__()
        self.name = name
        self.keeper = keeper
        self.ship_interval_s = ship_interval_s
        self.adopt_timeout_s = adopt_timeout_s
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._ship, name="checkpoint-shipper", daemon=True).start()

    def _ship(self) -> None:
        while True:
            queued = [self._outbox.get()]
            time.sleep(self.ship_interval_s)
            while not self._outbox.empty():
                queued.append(self._outbox.get_nowait())
            drops = [key for key, first, _ in queued if first is None]
            # a chunk of a request that finished meanwhile is not worth shipping
            items = [item for item in queued if item[1] is not None and self.num_blocks(item[0])]
            if items:
                self.keeper.put_many.remote(_join_runs([(k, first, *_pack(c)) for k, first, c in items]))
            if drops:  # a put of these still in flight finds them closed
                self.keeper.drop_many.remote(drops)

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None:
        super().put(key, first_block, chunk)
        self._outbox.put((key, first_block, chunk))

    def drop(self, key: str) -> None:
        super().drop(key)
        self._outbox.put((key, None, None))  # one call per interval for every request that ended

    def adopt(self, handle: CheckpointHandle, key: str) -> int:
        """Take over a checkpoint (possibly another worker's, on any node) under `key`: its
        blocks come into the host copy here, and into this node's keeper. Runs on the
        engine's loader thread; a keeper that is gone or slower than `adopt_timeout_s`
        counts as a lost checkpoint (the request recomputes), never a hang."""
        try:
            if handle.store == self.name:
                self._adopt_own(handle.key, key)
            else:
                self._adopt_other(handle, key)
        except (ValueError, ray.exceptions.RayError):  # GetTimeoutError is a RayError
            pass  # what did not arrive is recomputed
        return self.num_blocks(key)

    def _adopt_own(self, source: str, key: str) -> None:
        ray.get(self.keeper.move.remote(source, key), timeout=self.adopt_timeout_s)
        if self.num_blocks(source):  # our own: the host copy has it, maybe ahead of the keeper
            self._chunks[key] = self._chunks.pop(source)
        elif not self.num_blocks(key):
            data = ray.get(self.keeper.get.remote(key), timeout=self.adopt_timeout_s)
            if data is not None:
                super().put(key, 0, data)

    def _adopt_other(self, handle: CheckpointHandle, key: str) -> None:
        other = ray.get_actor(handle.store, namespace=NAMESPACE)  # ValueError: that node is gone
        data = ray.get(other.get.remote(handle.key), timeout=self.adopt_timeout_s)
        if data is None or self.num_blocks(key):  # gone, or adopted already
            return
        other.drop.remote(handle.key)
        super().put(key, 0, data)
        self.keeper.put.remote(key, 0, data)  # for whoever resumes it after this worker dies

    def send(self, handle: CheckpointHandle, node_id: str) -> CheckpointHandle:
        """Put checkpoint `handle` of this store into the keeper of node `node_id`, and return
        its handle there: a draining worker's, so that whoever resumes the request finds it
        after this node is gone. Waits until that keeper holds it. A handle of another store,
        or a keeper that fails, comes back as it was (the request may then recompute)."""
        data = self.get(handle.key) if handle.store == self.name else None
        if data is None:
            return handle
        try:
            name, keeper = keeper_on(node_id)
            ray.get(keeper.put_many.remote([(handle.key, 0, *_pack(data))]), timeout=self.adopt_timeout_s)
        except (ValueError, ray.exceptions.RayError):  # the node is gone, or its keeper failed
            return handle
        if name == self.name:  # our own keeper: it keeps the one copy; the host copy goes
            super().drop(handle.key)
        else:
            self.drop(handle.key)
        return CheckpointHandle(name, handle.key, min(handle.tokens, data.shape[2] * data.shape[3]))


def _join_runs(items: list[tuple[str, int, np.ndarray, str]]) -> list[tuple[str, int, np.ndarray, str]]:
    """Join each run of one request's consecutive packed chunks into one (order kept).

    In numpy, not torch: this runs on the shipper thread, and on the CPU a torch op big enough
    to go parallel there starts a second OpenMP team that slows every later step of the engine
    (1.7x on the coserve bench's offline steps)."""
    runs: dict[str, list] = {}
    out: list[list] = []
    for key, first, data, dtype in items:
        run = runs.get(key)
        if run is not None and run[1] + sum(a.shape[2] for a in run[2]) == first and run[3] == dtype:
            run[2].append(data)
        else:
            runs[key] = run = [key, first, [data], dtype]
            out.append(run)
    return [
        (key, first, np.concatenate(arrays, axis=2) if len(arrays) > 1 else arrays[0], dtype)
        for key, first, arrays, dtype in out
    ]
