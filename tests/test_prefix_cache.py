"""Prefix caching: shared full blocks give the same greedy output as computing everything,
ref counts and the hash index stay right under preemption, and hits are reported."""

from __future__ import annotations

import pytest

from harvest.checkpoint.store import HostCheckpointStore
from harvest.engine import SamplingParams
from harvest.engine.block_manager import BlockManager
from harvest.engine.request import Request, RequestStatus
from tests.helpers import make_engine, make_prompts, run_checked

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
BLOCK = 4  # make_engine's block size
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def shared_prefix_prompts(engine) -> list[list[int]]:
    """Prompts sharing a prefix of every length around the block boundaries with one base
    prompt, each with its own tail, plus the base itself and a prompt that is a whole
    number of blocks of it (all of it cached but the last token)."""
    base = make_prompts(engine, [24])[0]
    tails = make_prompts(engine, [5] * 6, start=200)
    shared = [BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 1, 5 * BLOCK]
    return [base, base[: 2 * BLOCK], *(base[:n] + tail for n, tail in zip(shared, tails))]


def generate(engine, prompts, params=GREEDY, request_class="offline") -> list[list[int]]:
    ids = [engine.add_request(p, params, request_class=request_class) for p in prompts]
    done = run_checked(engine)
    return [done[i].token_ids for i in ids]


def cacheable_tokens(prompt: list[int]) -> int:
    """What a warm cache serves of a prompt: its full blocks, leaving one token to compute."""
    return (len(prompt) - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_is_identical_with_the_cache_on_and_off(tiny_models, arch):
    # a small step budget admits the prompts over several steps, so later ones hit blocks
    # the earlier ones computed within the first pass already
    off = make_engine(tiny_models[arch], enable_prefix_caching=False, max_num_batched_tokens=32)
    on = make_engine(tiny_models[arch], max_num_batched_tokens=32)
    prompts = shared_prefix_prompts(on)
    expected = generate(off, prompts)
    assert off.stats.prefix_hit_tokens == 0 and off.block_manager.num_cached_blocks == 0
    assert len({tuple(e) for e in expected}) > 1, "degenerate model: every prompt gave the same output"

    assert generate(on, prompts) == expected
    first_pass_hits = on.stats.prefix_hit_tokens
    assert first_pass_hits > 0

    assert generate(on, prompts) == expected  # warm: every full prompt block is cached
    assert on.stats.prefix_hit_tokens - first_pass_hits == sum(cacheable_tokens(p) for p in prompts)
    assert on.stats.prefix_queried_tokens == 2 * sum(len(p) for p in prompts)
    stats = on.stats.as_dict()
    assert stats["prefix_hit_rate"] == pytest.approx(
        stats["prefix_hit_tokens"] / stats["prefix_queried_tokens"]
    )
    assert 0.5 < stats["prefix_hit_rate"] < 1


def test_tiny_pool_with_preemption_keeps_ref_counts_and_outputs(tiny_model):
    """13 blocks of 4 for eight sequences sharing a prefix: requests wait, get preempted and
    come back onto shared blocks; run_checked checks ref counts and the index every step."""
    roomy = make_engine(tiny_model, enable_prefix_caching=False)
    base = make_prompts(roomy, [10])[0]
    prompts = [base + tail for tail in make_prompts(roomy, [3 + i for i in range(8)], start=200)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = generate(roomy, prompts, params)
    for policy in ("harvest", "priority-recompute", "fcfs"):
        engine = make_engine(tiny_model, num_blocks=13, max_num_batched_tokens=16, policy=policy)
        assert generate(engine, prompts, params) == expected, policy
        assert engine.stats.preemptions > 0, policy
        assert engine.stats.prefix_hit_tokens > 0, policy


def computed(bm: BlockManager, req: Request, cached: list[int] | None = None) -> Request:
    """Allocate the request's blocks (on its cached prefix) and mark all but its last token
    computed, as a step would, offering its full blocks to the cache."""
    cached = bm.cached_prefix(req) if cached is None else cached
    assert bm.allocate(req, req.num_tokens, cached)
    req.num_computed_tokens = req.num_tokens - 1
    bm.cache_full_blocks(req)
    return req


def test_shared_blocks_are_freed_only_by_their_last_holder_and_evicted_lru():
    bm = BlockManager(num_blocks=8, block_size=4)
    params = SamplingParams()
    a = computed(bm, Request("a", list(range(9)), params))
    b = computed(bm, Request("b", [*range(8), 99], params))
    assert a.block_table == [0, 1, 2] and b.block_table == [0, 1, 3]  # two full blocks shared
    bm.check_integrity([a, b])
    assert bm.num_used_blocks == 4 and bm.num_cached_blocks == 2

    bm.free(a)  # a's own tail is freed; the shared prefix stays b's
    bm.check_integrity([b])
    assert bm.num_used_blocks == 3
    bm.free(b)
    bm.check_integrity([])
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2  # free, and still findable
    c = Request("c", list(range(9)), params)
    assert bm.cached_prefix(c) == [0, 1]

    # blocks holding no cached prefix are handed out first: d gets the six of them
    d = computed(bm, Request("d", [50 + i for i in range(24)], params), cached=[])
    assert d.block_table == [4, 5, 6, 7, 2, 3] and bm.num_cached_blocks == 2 + 5
    assert bm.cached_prefix(c) == [0, 1]
    bm.free(d)
    # e needs three: the last unnamed one, then the least recently freed cached ones (c's
    # prefix, freed before d's), tail first
    e = computed(bm, Request("e", [80 + i for i in range(12)], params), cached=[])
    assert e.block_table == [3, 1, 0]
    bm.check_integrity([e])
    assert bm.cached_prefix(c) == []
    assert bm.cached_prefix(Request("d2", [50 + i for i in range(24)], params)) == [4, 5, 6, 7, 2]


def test_lru_evicts_the_least_recently_freed_prefix_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    params = SamplingParams()
    old = computed(bm, Request("old", [1] * 4 + [2], params))  # one full block
    new = computed(bm, Request("new", [3] * 4 + [4], params))
    bm.free(old)  # freed first: least recently used
    bm.free(new)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    two = Request("two", [5] * 8, params)
    assert bm.allocate(two, 8) and bm.num_cached_blocks == 2  # the unnamed blocks went first
    three = Request("three", [6] * 4, params)
    assert bm.allocate(three, 4)  # evicts old's block, not new's
    bm.check_integrity([two, three])
    assert bm.cached_prefix(Request("old?", [1] * 4 + [2], params)) == []
    assert bm.cached_prefix(Request("new?", [3] * 4 + [4], params)) == [2]


def test_integrity_check_catches_a_wrong_ref_count_and_a_stale_hash():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, Request("a", [1] * 5, SamplingParams()))
    bm.check_integrity([a])
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity([])  # a holds two blocks nobody accounts for
    a.token_ids[0] = 7  # the cached block no longer holds a's tokens
    a.block_hashes.clear()
    with pytest.raises(AssertionError, match="another prefix"):
        bm.check_integrity([a])


@pytest.mark.parametrize("first, second", [("offline", "online"), ("online", "offline")])
def test_a_request_reuses_blocks_the_other_class_computed(tiny_model, first, second):
    engine = make_engine(tiny_model)
    base, tail = make_prompts(engine, [22, 9])
    long_params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = generate(make_engine(tiny_model, enable_prefix_caching=False), [base, base[:20] + tail])

    a = engine.add_request(base, long_params, request_class=first)
    engine.step()  # a's prompt is computed and its five full blocks cached
    b = engine.add_request(base[:20] + tail, GREEDY, request_class=second)
    engine.step()
    engine.scheduler.check_integrity()
    ra, rb = engine.requests[a], engine.requests[b]
    assert rb.block_table[:5] == ra.block_table[:5]  # the same blocks, held by both
    assert engine.last_step.prefix_hit_tokens == 20
    # the step computed b's uncached tail and a's decode only
    assert engine.last_step.online_tokens + engine.last_step.offline_tokens == 9 + 1

    done = run_checked(engine)
    assert done[b].token_ids == expected[1]
    assert done[a].token_ids[: GREEDY.max_tokens] == expected[0]


def test_evicting_an_offline_request_keeps_the_blocks_an_online_one_shares(tiny_model):
    """Online work evicts offline work sharing its prefix: the offline request lets go of its
    references, the shared blocks stay the online request's, and both outputs are right."""
    engine = make_engine(tiny_model, num_blocks=17, max_num_batched_tokens=64)
    base, tail = make_prompts(engine, [20, 8])
    other = make_prompts(engine, [40], start=300)[0]
    reference = make_engine(tiny_model, enable_prefix_caching=False)
    expected = generate(reference, [base, base[:16] + tail])
    off = engine.add_request(base, GREEDY)
    engine.step()
    on = engine.add_request(base[:16] + tail, GREEDY, request_class="online")
    engine.step()
    shared = engine.requests[on].block_table[:4]
    assert shared == engine.requests[off].block_table[:4]
    # another online request needing all the pool has left once the offline request gives
    # way (10 blocks: 8 free, and the 2 of its 6 it does not share; the 4 shared stay held)
    engine.add_request(
        other, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), request_class="online"
    )
    engine.step()
    engine.scheduler.check_integrity()
    assert engine.requests[off].block_table == [] and engine.requests[off].num_preemptions == 1
    assert engine.requests[on].block_table[:4] == shared
    done = run_checked(engine)
    assert [done[off].token_ids, done[on].token_ids] == expected


@pytest.mark.parametrize("cache", [True, False])
def test_recomputed_tokens_are_those_the_cache_does_not_serve_back(tiny_model, cache):
    """An offline request evicted for a seat keeps its blocks in the cache; readmitted, it
    takes its full blocks back and computes only the rest of what it had: only that counts
    as recomputed (with the cache off, everything it had computed)."""
    engine = make_engine(tiny_model, max_num_seqs=1, policy="priority-recompute", enable_prefix_caching=cache)
    prompt, other = make_prompts(engine, [13, 6])
    rid = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for _ in range(3):  # the prompt, then two decode steps
        engine.step()
    computed = engine.requests[rid].num_computed_tokens
    assert computed == 15
    engine.add_request(other, GREEDY, request_class="online")
    engine.step()
    assert engine.requests[rid].num_preemptions == 1 and engine.stats.recomputed_tokens == 0
    run_checked(engine)
    served_back = computed // BLOCK * BLOCK if cache else 0
    assert engine.stats.recomputed_tokens == computed - served_back


def test_checkpoint_restore_writes_only_past_a_cached_prefix(tiny_model):
    """A request resumed from a checkpoint onto a prefix another running request holds takes
    the shared blocks from the cache and restores only the rest; neither output changes."""
    prompt, tail = make_prompts(make_engine(tiny_model), [26, 6])
    neighbour = prompt[:16] + tail
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    reference = make_engine(tiny_model, enable_prefix_caching=False)
    expected = generate(reference, [prompt, neighbour], params)
    store = HostCheckpointStore()
    first = make_engine(tiny_model, checkpoint_store=store)
    rid = first.add_request(prompt, params, request_id="resumed")
    for _ in range(9):
        first.step()
    state = first.export(rid)
    assert state.checkpoint.tokens == 32

    second = make_engine(tiny_model, checkpoint_store=store)
    nid = second.add_request(neighbour, params, request_id="neighbour")
    second.step()  # the neighbour's first four blocks are cached and held
    second.resume(state)
    second.step()  # admitted: the cached prefix shared, the rest of its blocks loading
    second.scheduler.check_integrity()
    assert second.requests[rid].status is RequestStatus.LOADING
    assert second.requests[rid].block_table[:4] == second.requests[nid].block_table[:4]
    assert second.last_step.prefix_hit_tokens == 16
    second.loader.settle()
    second.step()
    assert second.last_step.restored_tokens == 32 - 16
    done = run_checked(second)
    assert [done[rid].token_ids, done[nid].token_ids] == expected
