"""EngineLoop: the background step thread, its asyncio and callback APIs, abort and health."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from harvest.engine import Engine, FinishReason, RequestOutput, SamplingParams
from harvest.serving import EngineLoop, EngineLoopError
from tests.helpers import make_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=800, temperature=0, ignore_eos=True)  # seconds of work on CPU


class StepGate:
    """Blocks the engine inside its forward (a pre-hook on layer 0) until released."""

    def __init__(self, engine: Engine, fail: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.handle = engine.runner.model.model.layers[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.entered.set()
        if self.fail:
            raise RuntimeError("boom")
        self.release.wait(30)

    def remove(self) -> None:
        self.release.set()
        self.handle.remove()


class Recorder:
    """An `on_step` hook that remembers finished outputs and signals each one."""

    def __init__(self) -> None:
        self.finished: list[RequestOutput] = []
        self.event = threading.Event()

    def __call__(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.finished.append(out)
                self.event.set()


@pytest.fixture
def engine(tiny_model) -> Engine:
    return make_engine(tiny_model, max_num_seqs=8)


async def collect(loop: EngineLoop, prompt: str | list[int], params: SamplingParams) -> list[RequestOutput]:
    return [out async for out in loop.generate(prompt, params)]


def test_generate_yields_step_outputs_matching_engine_generate(engine, loops):
    prompts = ["The miller", "Once upon a time there was a river", "Q"]
    reference = engine.generate(prompts, GREEDY)  # before the loop thread owns the engine
    loop = EngineLoop(engine)
    loops.append(loop)

    async def run_all() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(loop, p, GREEDY) for p in prompts))

    for outs, ref in zip(asyncio.run(run_all()), reference):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert len({o.request_id for o in outs}) == 1
        final = outs[-1]
        assert final.token_ids == ref.token_ids
        assert [t for o in outs for t in o.new_token_ids] == ref.token_ids
        assert "".join(o.delta_text for o in outs) == final.text
        assert final.finish_reason is FinishReason.LENGTH
        assert final.num_prompt_tokens == ref.num_prompt_tokens and final.num_output_tokens == 8
    stats = loop.stats()
    assert stats["finished"] == {"length": 3}
    assert stats["pending_online"] == 0 and stats["totals"]["generated_online"] == 3 * 8


def test_submit_callbacks_from_a_plain_thread(engine, loops):
    loop = EngineLoop(engine)
    loops.append(loop)
    outputs: list[RequestOutput] = []
    done = threading.Event()

    def on_output(out: RequestOutput) -> None:
        outputs.append(out)
        if out.finished:
            done.set()

    def worker() -> None:
        loop.submit("a b c", GREEDY, "offline-1", "offline", on_output)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert done.wait(30)
    assert outputs[-1].request_id == "offline-1" and outputs[-1].num_output_tokens == 8
    assert sum(len(o.new_token_ids) for o in outputs) == 8
    assert loop.stats()["totals"]["generated_offline"] == 8
    with pytest.raises(ValueError, match="empty prompt"):
        loop.submit([], GREEDY, on_output=on_output)
    assert loop.num_pending() == 0  # the refused request left no sink behind


def test_idle_loop_blocks_instead_of_spinning(engine, loops):
    loop = EngineLoop(engine)
    loops.append(loop)
    asyncio.run(collect(loop, "warm up", GREEDY))
    steps = loop.stats()["loop_steps"]
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1  # a spinning loop would burn the whole 0.3 s
    assert loop.stats()["loop_steps"] == steps
    assert loop.healthy(max_stall_s=0.01)  # idle is not stalled, however long ago the last step was


def test_offline_steps_pause_after_online_work_but_online_never_waits(engine, loops):
    # within a minute of online work, each offline-only step is followed by a pause of 5000x
    # its own time (seconds): a submission must end the pause at once
    loop = EngineLoop(engine, offline_yield=5000.0, online_window_s=60.0)
    loops.append(loop)
    asyncio.run(collect(loop, "warm up", GREEDY))  # online work: the window opens
    loop.submit("offline work", LONG, request_class="offline")
    steps = loop.stats()["loop_steps"]
    time.sleep(0.5)
    assert loop.stats()["loop_steps"] - steps <= 2  # unpaced, a tiny model steps hundreds of times
    start = time.monotonic()
    outs = asyncio.run(collect(loop, "an online request", GREEDY))
    assert outs[-1].finished and time.monotonic() - start < 2.0


def test_cancelled_consumer_aborts_the_engine_request(engine, loops):
    recorder = Recorder()
    loop = EngineLoop(engine, on_step=recorder)
    loops.append(loop)

    async def read_two_then_cancel() -> None:
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in loop.generate("abort me", LONG, request_id="victim"):
                seen += 1
                if seen == 2:
                    started.set()

        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(read_two_then_cancel())
    assert recorder.event.wait(30)
    final = recorder.finished[0]
    assert final.request_id == "victim" and final.finish_reason is FinishReason.ABORT
    assert final.num_output_tokens < LONG.max_tokens
    assert not engine.has_unfinished()
    assert loop.stats()["finished"] == {"abort": 1} and loop.num_pending() == 0


def test_closing_the_iterator_aborts_too(engine, loops):
    recorder = Recorder()
    loop = EngineLoop(engine, on_step=recorder)
    loops.append(loop)

    async def first_then_close() -> None:
        outputs = loop.generate("close me", LONG)
        await anext(outputs)
        await outputs.aclose()

    asyncio.run(first_then_close())
    assert recorder.event.wait(30)
    assert recorder.finished[0].finish_reason is FinishReason.ABORT


def test_health_detects_a_stuck_step(engine, loops):
    loop = EngineLoop(engine)
    loops.append(loop)
    gate = StepGate(engine)
    try:
        done = threading.Event()
        loop.submit("stuck", GREEDY, on_output=lambda out: out.finished and done.set())
        assert gate.entered.wait(30)
        time.sleep(0.1)
        assert not loop.healthy(max_stall_s=0.05)
        assert loop.healthy(max_stall_s=60)
        assert loop.stats()["last_step_age_s"] >= 0.1
    finally:
        gate.remove()
    assert done.wait(30)
    assert loop.healthy(max_stall_s=0.05)  # unstuck and idle again


def test_stop_fails_pending_requests_and_refuses_new_ones(engine, loops):
    loop = EngineLoop(engine)
    loops.append(loop)
    gate = StepGate(engine)
    errors: list[BaseException] = []
    loop.submit("pending", LONG, on_output=lambda out: None, on_error=errors.append)
    assert gate.entered.wait(30)
    assert not loop.stop(timeout=0.05)  # still inside the stuck step
    gate.remove()
    assert loop.stop(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], EngineLoopError)
    assert not loop.running and not loop.healthy()
    with pytest.raises(EngineLoopError, match="stopped"):
        loop.submit("late", GREEDY)

    async def generate_after_stop() -> None:
        async for _ in loop.generate("late", GREEDY):
            pass

    with pytest.raises(EngineLoopError):
        asyncio.run(generate_after_stop())


def test_a_failing_step_kills_the_loop_and_fails_consumers(engine, loops):
    loop = EngineLoop(engine)
    loops.append(loop)
    gate = StepGate(engine, fail=True)
    try:
        with pytest.raises(EngineLoopError, match="boom"):
            asyncio.run(collect(loop, "explode", GREEDY))
    finally:
        gate.remove()
    assert isinstance(loop.error, RuntimeError)
    assert not loop.healthy() and loop.stats()["running"] is False
