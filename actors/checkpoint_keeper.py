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
from typing import Any

import ray
import torch

NAMESPACE = "harvest"


class CheckpointKeeper:
    """Holds the refs of checkpoint chunks, keyed by request and first block.

    Calls may run concurrently (a threaded actor), so chunks can arrive out of order; a
    checkpoint is the run of chunks contiguous from block 0, and a gap (a chunk lost with
    its worker) ends it.
    """

    def __init__(self) -> None:
        self.refs: dict[str, dict[int, tuple[int, ray.ObjectRef]]] = {}
        self.closed: set[str] = set()  # moved or dropped: a put still in flight must not revive them
        self.bytes = 0

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None:
        if key in self.closed:
            return
        self.refs.setdefault(key, {})[first_block] = (chunk.shape[2], ray.put(chunk))
        self.bytes += chunk.numel() * chunk.element_size()

    def _prefix(self, key: str) -> list[ray.ObjectRef]:
        chunks, refs, block = self.refs.get(key, {}), [], 0
        while block in chunks:
            n, ref = chunks[block]
            refs.append(ref)
            block += n
        return refs

    def get(self, key: str) -> torch.Tensor | None:
        refs = self._prefix(key)
        return torch.cat(ray.get(refs), dim=2) if refs else None

    def num_blocks(self, key: str) -> int:
        chunks, block = self.refs.get(key, {}), 0
        while block in chunks:
            block += chunks[block][0]
        return block

    def move(self, source: str, dest: str) -> int:
        """Hand `source`'s chunks to `dest` (refs only, no data copied); returns its blocks."""
        self.refs[dest] = self.refs.pop(source, {})
        self.closed.add(source)
        self.closed.discard(dest)
        return self.num_blocks(dest)

    def drop(self, key: str) -> None:
        self.refs.pop(key, None)  # the refs go out of scope: Ray frees the objects
        self.closed.add(key)

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self.refs),
            "chunks": sum(len(c) for c in self.refs.values()),
            "bytes_put": self.bytes,
        }


def keeper_name(node_id: str) -> str:
    return f"harvest-ckpt-{node_id[:16]}"


def keeper_for_this_node() -> tuple[str, Any]:
    """The keeper of the node we run on, created on first use (detached, pinned to the node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    name = keeper_name(node_id)
    handle = (
        ray.remote(num_cpus=0, max_concurrency=64)(CheckpointKeeper)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                 scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote()
    )  # fmt: skip
    return name, handle


class RayCheckpointStore:
    """The engine's `CheckpointStore` over this node's keeper.

    `put` only queues the chunk: a background thread ships it to the keeper, so the step
    loop never pays for serialising into the object store (about 0.5 ms for a 72 KB
    block on the CPU here). Block counts are tracked here for what this store put or
    adopted; handles name the keeper so another worker can adopt them.
    """

    def __init__(self, name: str, keeper: Any) -> None:
        self.name = name
        self.keeper = keeper
        self._blocks: dict[str, int] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._ship, name="checkpoint-shipper", daemon=True).start()

    def _ship(self) -> None:
        while True:
            key, first_block, chunk = self._outbox.get()
            self.keeper.put.remote(key, first_block, chunk)

    def put(self, key: str, first_block: int, chunk: torch.Tensor) -> None:
        self._outbox.put((key, first_block, chunk))
        self._blocks[key] = first_block + chunk.shape[2]

    def get(self, key: str) -> torch.Tensor | None:
        return ray.get(self.keeper.get.remote(key))

    def num_blocks(self, key: str) -> int:
        return self._blocks.get(key, 0)

    def drop(self, key: str) -> None:
        self._blocks.pop(key, None)
        self.keeper.drop.remote(key)

    def handle(self, key: str) -> str:
        return f"{self.name}|{key}"

    def adopt(self, handle: str, key: str) -> int:
        """Take over a checkpoint (possibly another worker's, on any node) under `key`."""
        name, source = handle.split("|", 1)
        if name == self.name:
            blocks = ray.get(self.keeper.move.remote(source, key))
        else:
            try:
                other = ray.get_actor(name, namespace=NAMESPACE)
                data = ray.get(other.get.remote(source))
                other.drop.remote(source)
            except (ValueError, ray.exceptions.RayError):
                data = None  # that node is gone: recompute
            blocks = 0
            if data is not None:
                ray.get(self.keeper.put.remote(key, 0, data))
                blocks = data.shape[2]
        self._blocks[key] = blocks
        return blocks
