"""Checkpoint restores are a load state: off the step, joined to a batch once the blocks are in."""

from __future__ import annotations

import dataclasses
import threading
import time

import orjson
import pytest

from harvest.checkpoint import CheckpointHandle
from harvest.checkpoint.store import HostCheckpointStore
from harvest.engine import RequestStatus, SamplingParams
from harvest.queue import Progress
from tests.helpers import make_engine, make_prompts, run_checked, step_checked

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
ONLINE = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class GatedStore(HostCheckpointStore):
    """Adoptions wait until `gate` opens: a keeper on another node, as slow as a test needs.
    (Reads are local and never slow: see CheckpointStore.get.)"""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.adoptions = 0

    def adopt(self, handle, key):
        self.adoptions += 1
        assert self.gate.wait(60), "the test never opened the gate"
        if (chunks := self._chunks.pop(handle.key, None)) is not None:
            self._chunks[key] = chunks
        return self.num_blocks(key)


def elsewhere(states):
    """The states as if their checkpoints were in another node's keeper: resuming adopts them."""
    away = lambda handle: dataclasses.replace(handle, store="elsewhere")  # noqa: E731
    return [dataclasses.replace(s, checkpoint=away(s.checkpoint)) for s in states]


class UnreadableStore(HostCheckpointStore):
    def get(self, key):
        raise OSError("checkpoint backend gone")


def reference(model, prompts, params=GREEDY):
    return [o.token_ids for o in make_engine(model).generate(prompts, params)]


def exported(model, store, lengths, steps: int = 9):
    """Requests run `steps` steps on one engine, then taken out with their checkpoints."""
    first = make_engine(model, checkpoint_store=store)
    prompts = make_prompts(first, lengths)
    ids = [first.add_request(p, GREEDY) for p in prompts]
    for _ in range(steps):
        step_checked(first)
    states = [first.export(i) for i in ids]
    assert all(s.checkpoint is not None and s.checkpoint.tokens > 0 for s in states)
    return prompts, ids, states


def test_handle_round_trips_through_progress_as_a_dict():
    handle = CheckpointHandle("harvest-ckpt-0123", "job/2/7@3", 48)
    raw = Progress([1, 2, 3], handle).to_json()
    assert orjson.loads(raw)["checkpoint"] == {"store": "harvest-ckpt-0123", "key": "job/2/7@3", "tokens": 48}
    assert Progress.from_json(raw) == Progress([1, 2, 3], handle)
    assert Progress.from_json(Progress([4]).to_json()) == Progress([4], None)
    # a record from before handles were typed, or a broken one: resumed without a checkpoint
    assert Progress.from_json(b'{"token_ids": [1], "checkpoint": "keeper|rid#16"}').checkpoint is None
    assert Progress.from_json(b'{"token_ids": [1], "checkpoint": {"store": "x"}}').checkpoint is None
    with pytest.raises(ValueError, match="not a checkpoint handle"):
        CheckpointHandle.from_dict({"store": "x", "key": "y", "tokens": "many"})


def test_a_load_completes_across_steps_while_online_requests_step(tiny_model):
    """The store holds the load back; the online request runs to its end meanwhile, the
    loading ones hold their blocks and compute nothing, and once the load is in their output
    is what an uninterrupted run gives, with nothing recomputed."""
    store = GatedStore()
    prompts, ids, states = exported(tiny_model, store, [13, 26])
    states = elsewhere(states)
    expected = reference(tiny_model, prompts)
    online_expected = reference(tiny_model, [[5, 6, 7]], ONLINE)[0]
    second = make_engine(tiny_model, checkpoint_store=store)
    second.add_request([5, 6, 7], ONLINE, request_id="online", request_class="online")
    for s in states:
        second.resume(s)
    online = None
    while online is None:
        outs = step_checked(second)
        online = next((o for o in outs if o.request_id == "online" and o.finished), None)
        assert all(second.requests[i].status is RequestStatus.LOADING for i in ids)
        assert all(second.requests[i].block_table for i in ids)  # their blocks are allocated
        assert second.last_step.offline_tokens == 0 and second.last_step.restored_tokens == 0
    assert online.token_ids == online_expected
    assert store.adoptions == 1  # the loader waits in the store, the step does not
    store.gate.set()
    done = run_checked(second)
    assert [done[i].token_ids for i in ids] == expected
    assert second.stats.restored_tokens == sum(s.checkpoint.tokens for s in states)
    assert second.stats.recomputed_tokens == 0
    assert len(store) == 0  # finished requests drop their checkpoints


@pytest.mark.parametrize("how", ["dropped", "unreadable", "short"])
def test_a_missing_checkpoint_falls_back_to_recompute(tiny_model, how):
    store = HostCheckpointStore()
    prompts, ids, states = exported(tiny_model, store, [13, 26])
    expected = reference(tiny_model, prompts)
    if how == "dropped":  # its node died with it
        for s in states:
            store.drop(s.request_id)
    elif how == "unreadable":
        store = UnreadableStore()
    else:  # the keeper got fewer blocks than the worker reported
        for s in states:
            store._chunks[s.request_id] = store._chunks[s.request_id][:1]
    kept = sum(store.num_blocks(s.request_id) for s in states) * 4
    second = make_engine(tiny_model, checkpoint_store=store)
    for s in states:
        second.resume(s)
    done = run_checked(second)
    assert [done[i].token_ids for i in ids] == expected
    assert second.stats.restored_tokens == kept
    assert (kept > 0) == (how == "short")


def test_preempting_a_loading_request_is_safe(tiny_model):
    """An online request evicts a request whose load is under way: the load is cancelled
    before its blocks go to the online request, and never lands in them afterwards."""
    store = GatedStore()
    prompts, ids, states = exported(tiny_model, store, [26])
    states = elsewhere(states)
    expected = reference(tiny_model, prompts)
    online_prompt = make_prompts(make_engine(tiny_model), [21], start=300)[0]
    online_expected = reference(tiny_model, [online_prompt], ONLINE)[0]
    second = make_engine(tiny_model, checkpoint_store=store, num_blocks=13)
    second.resume(states[0])
    step_checked(second)
    loading = second.requests[ids[0]]
    assert loading.status is RequestStatus.LOADING and len(loading.block_table) == 8
    second.add_request(online_prompt, ONLINE, request_id="online", request_class="online")
    step_checked(second)  # 5 blocks free, the online prompt needs 6: the loading request gives way
    assert loading.status is RequestStatus.WAITING and loading.block_table == []
    assert loading.num_preemptions == 1 and loading.checkpointed_tokens == 32
    store.gate.set()  # the cancelled load's adoption returns now: it must not copy
    deadline, done = time.monotonic() + 30, {}
    while second.loader.pending or store.adoptions < 2:  # the request's second load comes and finishes
        assert time.monotonic() < deadline
        done |= {o.request_id: o for o in step_checked(second) if o.finished}
    done |= run_checked(second)
    assert done["online"].token_ids == online_expected
    assert done[ids[0]].token_ids == expected[0]
    assert second.stats.restored_tokens == 32  # the second load's, once


def test_a_request_aborted_while_adopting_leaves_nothing_behind(tiny_model):
    """Resumed under a new id (as the queue does), the request adopts its old checkpoint; it
    is aborted while the adoption hangs, and what the adoption brings later is dropped."""
    store = GatedStore()
    _, ids, states = exported(tiny_model, store, [26])
    second = make_engine(tiny_model, checkpoint_store=store)
    second.resume(dataclasses.replace(states[0], request_id="again"))
    step_checked(second)
    assert second.requests["again"].status is RequestStatus.LOADING and store.adoptions == 1
    second.abort("again")
    assert [(o.request_id, o.finish_reason.value) for o in step_checked(second)] == [("again", "abort")]
    assert second.block_manager.num_free_blocks == second.block_manager.num_blocks
    assert store.num_blocks(ids[0]) == 8  # the adoption has not moved it yet
    store.gate.set()
    deadline = time.monotonic() + 30
    while len(store):  # moved under "again" by the late adoption, then dropped
        assert time.monotonic() < deadline, f"left behind: {list(store._chunks)}"
        time.sleep(0.01)
    assert not second.has_unfinished() and not second.loader.pending


def test_a_save_from_an_earlier_block_supersedes_what_the_store_held():
    """A request that adopted a checkpoint trusts only the blocks its handle promised; when it
    saves again from there, the store cuts its copy at that block instead of refusing."""
    import torch

    store = HostCheckpointStore()
    block = lambda value, n=1: torch.full((1, 2, n, 4, 1, 2), float(value))  # noqa: E731
    store.put("r", 0, block(0, 2))
    store.put("r", 2, block(2, 2))  # 4 blocks held
    store.put("r", 3, block(9))  # supersedes block 3 only
    assert store.num_blocks("r") == 4
    assert store.get("r")[0, 0, :, 0, 0, 0].tolist() == [0, 0, 2, 9]
    store.put("r", 1, block(7, 2))  # cuts inside the first chunk
    assert store.num_blocks("r") == 3
    assert store.get("r")[0, 0, :, 0, 0, 0].tolist() == [0, 7, 7]
    with pytest.raises(ValueError, match="out of order"):
        store.put("r", 5, block(1))  # a gap is still refused
