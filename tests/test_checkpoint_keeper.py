"""KV checkpoints in the Ray object store outlive the worker that made them."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from actors.checkpoint_keeper import (
    NAMESPACE,
    CheckpointKeeper,
    RayCheckpointStore,
    _join_runs,
    _pack,
    _unpack,
    keeper_for_this_node,
)
from harvest.checkpoint import CheckpointHandle


@ray.remote(num_cpus=0)
class Producer:
    """Stands in for a GPU worker: checkpoints through its node's keeper, then dies."""

    def __init__(self) -> None:
        self.store = RayCheckpointStore(*keeper_for_this_node())

    def checkpoint(self, key: str, chunks: list[torch.Tensor]) -> CheckpointHandle:
        first = 0
        for chunk in chunks:
            self.store.put(key, first, chunk)
            first += chunk.shape[2]
        while ray.get(self.store.keeper.num_blocks.remote(key)) < first:  # puts are fire and forget
            time.sleep(0.01)
        return CheckpointHandle(self.store.name, key, first * 16)

    def pid(self) -> int:
        return os.getpid()


def wait_dead(actor, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.1)
    raise AssertionError("the producer is still alive")


def chunks(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # [layers, 2, blocks, block_size, kv_heads, head_dim], two chunks of 3 and 2 blocks
    return [torch.randn(2, 2, n, 16, 2, 8, generator=gen) for n in (3, 2)]


@pytest.mark.parametrize("how", ["SIGKILL", "ray.kill"])
def test_checkpoint_survives_the_death_of_its_producer(ray_cluster, how):
    producer = Producer.remote()
    data = chunks(1)
    handle = ray.get(producer.checkpoint.remote(f"req-{how}", data))
    if how == "SIGKILL":
        os.kill(ray.get(producer.pid.remote()), signal.SIGKILL)
    else:
        ray.kill(producer)
    wait_dead(producer)
    adopter = RayCheckpointStore(*keeper_for_this_node())
    assert adopter.adopt(handle, f"new-{how}") == 5
    assert torch.equal(adopter.get(f"new-{how}"), torch.cat(data, dim=2))
    assert adopter.adopt(handle, f"new-{how}") == 5  # adopted twice (a load retried): still there
    assert ray.get(adopter.keeper.get.remote(f"req-{how}")) is None  # moved, not copied: one owner
    ray.get(adopter.keeper.put.remote(f"req-{how}", 0, data[0]))  # a put still in flight from the dead
    assert ray.get(adopter.keeper.get.remote(f"req-{how}")) is None  # ... does not bring the moved key back
    assert torch.equal(ray.get(adopter.keeper.get.remote(f"new-{how}")), torch.cat(data, dim=2))
    adopter.drop(f"new-{how}")
    assert adopter.get(f"new-{how}") is None
    deadline = time.monotonic() + 30  # the store's drop is fire and forget
    while ray.get(adopter.keeper.num_blocks.remote(f"new-{how}")):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_gap_ends_the_checkpoint_and_order_does_not_matter(ray_cluster):
    store = RayCheckpointStore(*keeper_for_this_node())
    a, b = chunks(2)
    ray.get(store.keeper.put.remote("late", 3, b))  # arrives first
    assert ray.get(store.keeper.num_blocks.remote("late")) == 0
    ray.get(store.keeper.put.remote("late", 0, a))
    assert torch.equal(ray.get(store.keeper.get.remote("late")), torch.cat([a, b], dim=2))
    ray.get(store.keeper.put.remote("gap", 0, a))
    ray.get(store.keeper.put.remote("gap", 7, b))  # blocks 3..6 lost with their worker
    assert ray.get(store.keeper.num_blocks.remote("gap")) == 3
    assert torch.equal(ray.get(store.keeper.get.remote("gap")), a)


def test_restores_read_the_host_copy_and_shipping_joins_runs(ray_cluster):
    store = RayCheckpointStore(*keeper_for_this_node(), ship_interval_s=0.2)
    parts = [torch.randn(2, 2, 1, 16, 2, 8) for _ in range(4)]
    chunks_before = ray.get(store.keeper.stats.remote())["chunks"]
    for i, part in enumerate(parts):  # one block a step, as a decoding request fills them
        store.put("run", i, part)
    whole = torch.cat(parts, dim=2)
    deadline = time.monotonic() + 30
    while ray.get(store.keeper.num_blocks.remote("run")) < 4:
        assert time.monotonic() < deadline, "the keeper never got the chunks"
        time.sleep(0.02)
    chunks = ray.get(store.keeper.stats.remote())["chunks"] - chunks_before
    assert torch.equal(ray.get(store.keeper.get.remote("run")), whole)
    ray.get(store.keeper.drop.remote("run"))  # the keeper forgets it; this engine does not need it
    assert torch.equal(store.get("run"), whole)
    assert chunks < 4  # queued within one interval: shipped as fewer, joined chunks
    store.drop("run")
    assert store.get("run") is None and store.num_blocks("run") == 0


def test_join_runs_keeps_order_and_gaps():
    a, b, c, d = (torch.full((1, 2, 1, 4, 1, 2), float(i)) for i in range(4))
    packed = [(k, first, *_pack(t)) for k, first, t in [("x", 0, a), ("y", 5, b), ("x", 1, c), ("x", 3, d)]]
    joined = _join_runs(packed)
    assert [(k, first, t.shape[2]) for k, first, t, _ in joined] == [("x", 0, 2), ("y", 5, 1), ("x", 3, 1)]
    assert torch.equal(_unpack(*joined[0][2:]), torch.cat([a, c], dim=2))


def test_keeper_forgets_closed_requests_once_no_put_can_be_in_flight():
    now = [0.0]
    keeper = CheckpointKeeper(closed_ttl_s=60, clock=lambda: now[0])
    keeper.drop("old")
    keeper.put_many([("old", 0, np.zeros((1, 2, 1), np.uint8), "uint8")])  # a late put: refused
    assert keeper.stats()["keys"] == 0 and "old" in keeper.closed
    now[0] = 30.0
    keeper.move("moved", "new")
    now[0] = 61.0
    keeper.drop("last")  # each close forgets what closed longer than the TTL ago
    assert list(keeper.closed) == ["moved", "last"]
    now[0] = 1000.0
    keeper.drop("later")
    assert list(keeper.closed) == ["later"]  # bounded by what closed within the TTL


@ray.remote(num_cpus=0)
class SlowKeeper:
    """A keeper on a node that stopped answering in time."""

    def get(self, key: str) -> None:
        time.sleep(30)


def test_a_gone_or_slow_keeper_costs_a_recompute_not_a_hang(ray_cluster):
    store = RayCheckpointStore(*keeper_for_this_node(), adopt_timeout_s=0.5)
    gone = CheckpointHandle("harvest-ckpt-no-such-node", "req-1", 32)
    assert store.adopt(gone, "mine-1") == 0 and store.get("mine-1") is None
    slow = SlowKeeper.options(name="harvest-ckpt-slow", namespace=NAMESPACE).remote()
    ray.get(slow.__ray_ready__.remote())
    start = time.monotonic()
    assert store.adopt(CheckpointHandle("harvest-ckpt-slow", "req-2", 32), "mine-2") == 0
    assert time.monotonic() - start < 10  # the timeout, not the keeper's 30 s
    ray.kill(slow)


def test_a_draining_store_sends_a_checkpoint_to_a_named_nodes_keeper_and_waits(ray_cluster):
    store = RayCheckpointStore(*keeper_for_this_node(), ship_interval_s=60)  # its own shipping: never
    data = chunks(3)
    store.put("leaving", 0, data[0])
    store.put("leaving", 3, data[1])
    handle = CheckpointHandle(store.name, "leaving", 70)  # 4 blocks and a bit, as the engine saw it
    node = ray.get_runtime_context().get_node_id()  # one node here: its keeper is the worker's own
    sent = store.send(handle, node)
    assert sent == CheckpointHandle(keeper_for_this_node()[0], "leaving", 70)
    assert store.num_blocks("leaving") == 0  # the host copy went; the keeper holds it already
    assert torch.equal(ray.get(store.keeper.get.remote("leaving")), torch.cat(data, dim=2))
    assert store.send(CheckpointHandle("another-store", "x", 16), node).store == "another-store"
    adopter = RayCheckpointStore(*keeper_for_this_node())
    assert adopter.adopt(sent, "resumed") == 5
