"""Engine behaviour beyond greedy equality: sampling, stops, streaming, abort, validation."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import replace

import pytest

from harvest.engine import FinishReason, SamplingParams
from harvest.engine.block_manager import BlockManager
from harvest.engine.request import Request
from tests.helpers import make_engine, make_prompts, run_checked


@pytest.fixture(scope="module")
def engine(tiny_model):
    return make_engine(tiny_model)


def test_generate_returns_outputs_in_input_order(engine):
    prompts = ["The miller", "Once upon a time there was a little river that ran", "Q"]
    params = SamplingParams(max_tokens=6, temperature=0)
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert all(o.text == engine.tokenizer.decode(o.token_ids) for o in batched if o.finish_reason == "length")
    assert [o.num_prompt_tokens for o in batched] == [len(engine.tokenizer.encode(p)) for p in prompts]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    prompts = make_prompts(engine, [5, 9, 14])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = engine.generate([prompts[1]], params)[0].token_ids
    batched = engine.generate(prompts, params)[1].token_ids
    other_seed = engine.generate([prompts[1]], SamplingParams(max_tokens=10, temperature=1.0, seed=99))[0]
    assert alone == batched
    assert other_seed.token_ids != alone


def test_seeded_request_fed_its_own_output_continues_the_same(engine):
    """How the offline queue resumes on another worker: prompt + output so far, fewer tokens."""
    (prompt,) = make_prompts(engine, [7])
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    full = engine.generate([prompt], params)[0].token_ids
    rest = engine.generate([prompt + full[:5]], replace(params, max_tokens=7))[0]
    assert rest.token_ids == full[5:]
    unseeded = replace(params, seed=None)
    first, second = (engine.generate([prompt], unseeded)[0].token_ids for _ in range(2))
    assert first != second  # no seed: a fresh random one per request


def test_top_k_one_is_greedy(engine):
    prompt = make_prompts(engine, [11])
    greedy = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    top1 = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=5))[0]
    assert greedy.token_ids == top1.token_ids


def test_stop_token_ids_and_ignore_eos(engine):
    prompt = make_prompts(engine, [8])
    free = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == free.token_ids[: first + 1]
    assert free.finish_reason == FinishReason.LENGTH and free.num_output_tokens == 10


def test_stop_string_truncates_and_streams_consistently(engine):
    prompt = make_prompts(engine, [8])[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {free.text!r}"
    rid = engine.add_request(
        prompt, SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)
    )
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.delta_text)
            final = out if out.finished else final
    assert final.finish_reason == FinishReason.STOP
    assert final.text == free.text[: free.text.index(stop)]
    assert "".join(deltas) == final.text


def test_streamed_text_deltas_add_up(engine):
    rid = engine.add_request(make_prompts(engine, [6])[0], SamplingParams(max_tokens=15, temperature=0),
                             stream_text=True)  # fmt: skip
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.delta_text)
            if out.finished:
                final = out
    assert final.request_id == rid
    assert "".join(deltas) == final.text
    assert final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_abort_returns_blocks(tiny_model):
    engine = make_engine(tiny_model)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in make_prompts(engine, [10, 20, 30])]
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort(ids[1])
    outs = {o.request_id: o for o in engine.step()}
    assert outs[ids[1]].finished and outs[ids[1]].finish_reason == FinishReason.ABORT
    assert outs[ids[1]].num_output_tokens == 2
    engine.scheduler.check_integrity()
    engine.abort(ids[1])  # a second abort is a no-op
    assert ids[1] not in {o.request_id for o in engine.step()}
    for rid in (ids[0], ids[2]):
        engine.abort(rid)
    final = [o for o in engine.step() if o.finished]
    assert {o.request_id for o in final} == {ids[0], ids[2]}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_finished_requests_return_all_blocks(tiny_model):
    engine = make_engine(tiny_model, num_blocks=40)
    for p in make_prompts(engine):
        engine.add_request(p, SamplingParams(max_tokens=5, temperature=0))
    done = run_checked(engine)  # asserts the pool is whole again at the end
    assert len(done) == 10


def test_context_limit_finishes_with_length(tiny_model):
    engine = make_engine(tiny_model, max_model_len=24)
    out = engine.generate(
        make_prompts(engine, [20]), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    )
    assert out[0].finish_reason == FinishReason.LENGTH
    assert out[0].num_prompt_tokens + out[0].num_output_tokens == 24
    with pytest.raises(ValueError, match="at most 23"):
        engine.add_request(list(range(1, 30)), SamplingParams())


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop")],
)  # fmt: skip
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_block_manager_all_or_nothing():
    bm = BlockManager(num_blocks=5, block_size=4)
    a = Request("a", [1] * 9, SamplingParams())
    b = Request("b", [1] * 9, SamplingParams())
    assert bm.allocate(a, 9) and len(a.block_table) == 3
    assert not bm.allocate(b, 9) and b.block_table == []  # needs 3, only 2 free: nothing taken
    assert bm.allocate(a, 12) and len(a.block_table) == 3  # still fits in block 3
    assert bm.allocate(b, 8)
    bm.check_integrity([a, b])
    bm.free(a)
    assert bm.num_free_blocks == 3 and a.block_table == []
    bm.check_integrity([b])
    b.block_table.append(b.block_table[0])  # corrupt: a block twice
    with pytest.raises(AssertionError):
        bm.check_integrity([b])


def test_streamed_text_equals_decoding_the_output(engine):
    """Also when the output ends inside a multi-byte character (random models do that)."""
    prompts = make_prompts(engine, [3, 5, 8, 13, 21, 34])
    params = SamplingParams(max_tokens=9, temperature=0)
    plain = engine.generate(prompts, params)
    for prompt, expected in zip(prompts, plain):
        engine.add_request(prompt, params, stream_text=True)
        (streamed,) = run_checked(engine).values()
        assert streamed.token_ids == expected.token_ids
        assert streamed.text == expected.text


def test_device_seconds_share_each_step_by_tokens(engine):
    """Both requests run in one step (prefill and their only token): their device seconds
    split that step 4 : 12, and add up to no more than the step took."""
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    short, long = engine.generate(make_prompts(engine, [4, 12], start=600), one)
    assert short.device_seconds > 0
    assert long.device_seconds == pytest.approx(3 * short.device_seconds)
    assert short.device_seconds + long.device_seconds <= engine.last_step.measured_latency_s


def test_device_seconds_follow_a_request_through_its_steps(engine):
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (2, 10)]
    short, long = engine.generate(make_prompts(engine, [8, 8], start=700), params)
    # equal shares while both run, then eight steps of the longer one alone
    assert 0 < short.device_seconds < long.device_seconds
    req = Request("r", [1, 2, 3], SamplingParams())
    req.device_seconds = 0.5
    assert Request.from_state(req.export_state()).device_seconds == 0.5  # a resume keeps counting


def test_a_request_joins_on_the_stepping_thread_and_keeps_its_id_until_it_leaves(tiny_model):
    engine = make_engine(tiny_model)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    (prompt,) = make_prompts(engine, [5])
    engine.add_request(prompt, params, request_id="a")
    assert "a" not in engine.requests  # in the inbox: the next step registers it
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        engine.add_request(prompt, params, request_id="a")
    engine.step()
    assert engine.requests["a"].num_output_tokens == 1
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        engine.add_request(prompt, params, request_id="a")
    first = run_checked(engine)["a"]
    engine.add_request(prompt, params, request_id="a")  # finished: its id is free again
    assert run_checked(engine)["a"].token_ids == first.token_ids


def test_exporting_a_request_still_in_the_inbox_takes_it_out_whole(tiny_model):
    engine = make_engine(tiny_model)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, stop=["\x00never"])
    prompts = make_prompts(engine, [6, 9])
    expected = engine.generate(prompts, params)
    engine.add_request(prompts[0], params, request_id="stays")
    engine.add_request(prompts[1], params, request_id="leaves")
    state = engine.export("leaves")
    assert state.token_ids == prompts[1] and state.checkpoint is None
    engine.abort("leaves")  # no longer here: a no-op
    assert {rid: o.token_ids for rid, o in run_checked(engine).items()} == {"stays": expected[0].token_ids}
    engine.resume(state)  # its id is free, and it runs from the start
    assert run_checked(engine)["leaves"].text == expected[1].text


def test_adds_from_another_thread_while_the_engine_steps_are_neither_lost_nor_doubled(tiny_model):
    engine = make_engine(tiny_model, max_num_seqs=8)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = make_prompts(engine, [2 + i % 7 for i in range(40)])
    expected = [o.token_ids for o in engine.generate(prompts, params)]

    def add_all() -> None:
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=f"r{i}", stream_text=i % 2 == 0)
            time.sleep(0.001)  # spread the arrivals over many steps

    adder = threading.Thread(target=add_all)
    adder.start()
    outputs = defaultdict(list)
    while adder.is_alive() or engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
        engine.scheduler.check_integrity()
    adder.join()
    assert sorted(outputs) == sorted(f"r{i}" for i in range(len(prompts)))
    for i, want in enumerate(expected):
        outs = outputs[f"r{i}"]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]  # one final, last
        assert outs[-1].token_ids == want and [t for o in outs for t in o.new_token_ids] == want
        if i % 2 == 0:
            assert "".join(o.delta_text for o in outs) == outs[-1].text
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
