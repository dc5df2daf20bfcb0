"""The engine client seam: torch-free types, EngineLoop as an EngineClient (SLO changes and
checkpoint resumes through it), and the device profiles."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

from harvest.checkpoint.handle import CheckpointHandle
from harvest.checkpoint.store import HostCheckpointStore
from harvest.engine import RequestClass, RequestOutput, SamplingParams
from harvest.protocol.engine_client import EngineClient, EngineLimits
from harvest.serving import EngineLoop
from harvest.serving.device_profile import DeviceProfile
from tests.helpers import make_engine, make_prompts
from tests.test_engine_loop import StepGate


class Sink:
    """An output sink that keeps every output and signals the last."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.finished = threading.Event()

    def __call__(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        if out.finished:
            self.finished.set()


def test_the_queue_and_the_client_import_without_torch():
    code = (
        "import sys, harvest.queue.worker, harvest.queue.shard, harvest.client;"
        "import harvest.protocol.engine_client; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_loop_is_an_engine_client_with_fixed_limits(tiny_model, loops):
    engine = make_engine(tiny_model, max_num_seqs=8, num_blocks=40)
    loop = EngineLoop(engine)
    loops.append(loop)
    assert isinstance(loop, EngineClient)
    assert loop.limits == EngineLimits(engine.max_model_len, 160, 8, 4)
    assert loop.limits.max_request_tokens == min(engine.max_model_len, 160)
    assert loop.tokenizer is engine.tokenizer

    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    offline = Sink()
    loop.submit("a b c", params, "off", RequestClass.OFFLINE, offline)

    async def online() -> list[RequestOutput]:
        return [out async for out in loop.generate("a b c", params, "on")]

    assert {o.request_class for o in asyncio.run(online())} == {RequestClass.ONLINE}
    assert offline.finished.wait(30)
    assert {o.request_class for o in offline.outputs} == {RequestClass.OFFLINE}


def test_slo_changes_wait_for_the_loop_thread(tiny_model, loops):
    engine = make_engine(tiny_model, max_num_seqs=8)
    loop = EngineLoop(engine)
    loops.append(loop)
    before = (engine.scheduler.config.slo.ttft_s, engine.scheduler.config.slo.tpot_s)
    assert loop.slo == before
    with pytest.raises(ValueError):
        loop.set_slo(-1.0, 0.05)
    gate = StepGate(engine)
    try:
        loop.submit("a b c", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert gate.entered.wait(30)  # the loop thread is inside a step
        loop.set_slo(0.5, 0.01)
        slo = engine.scheduler.config.slo
        assert (slo.ttft_s, slo.tpot_s) == before  # not changed under the running step
    finally:
        gate.remove()
    applied = threading.Event()
    loop.on_step = lambda _: loop.slo == (0.5, 0.01) and applied.set()
    assert applied.wait(30)
    assert (engine.scheduler.config.slo.ttft_s, engine.scheduler.config.slo.tpot_s) == (0.5, 0.01)


def test_resume_from_a_reported_checkpoint_continues_exactly(tiny_model, loops):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    (prompt,) = make_prompts(make_engine(tiny_model), [26])
    expected = make_engine(tiny_model).generate([prompt], params)[0].token_ids
    store = HostCheckpointStore()
    first, second = (make_engine(tiny_model, checkpoint_store=store) for _ in range(2))
    first_loop = EngineLoop(first)
    loops.append(first_loop)
    seen: list[RequestOutput] = []

    def until_checkpointed(out: RequestOutput) -> None:
        seen.append(out)
        if out.checkpoint and len(out.token_ids) >= 12:
            first_loop.stop()  # from the loop thread: it ends after this step, the request unfinished

    first_loop.submit(prompt, params, "r@1", RequestClass.OFFLINE, until_checkpointed)
    first_loop._thread.join(30)
    last = seen[-1]
    assert not last.finished and last.checkpoint.key == "r@1"
    assert 0 < last.checkpoint.tokens <= len(prompt) + len(last.token_ids)

    loop = EngineLoop(second)
    loops.append(loop)
    sink = Sink()
    rest = replace(params, max_tokens=params.max_tokens - len(last.token_ids))
    loop.resume_from_checkpoint("r@2", prompt + last.token_ids, rest, last.checkpoint, sink)
    assert sink.finished.wait(60)
    done = sink.outputs[-1]
    assert last.token_ids + done.token_ids == expected
    assert second.stats.restored_tokens > 0  # from the checkpoint, not recomputed
    assert done.request_class is RequestClass.OFFLINE


def test_a_lost_checkpoint_starts_over_from_the_tokens(tiny_model, loops):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (prompt,) = make_prompts(make_engine(tiny_model), [10])
    engine = make_engine(tiny_model)
    expected = engine.generate([prompt], params)[0].token_ids
    loop = EngineLoop(engine)
    loops.append(loop)
    sink = Sink()
    loop.resume_from_checkpoint("gone@2", prompt, params, CheckpointHandle("host", "gone@1", 8), sink)
    assert sink.finished.wait(60)
    assert sink.outputs[-1].token_ids == expected and engine.stats.restored_tokens == 0


@pytest.fixture
def restore_host_tuning():
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(threads)


def test_the_cuda_profile_tunes_nothing(restore_host_tuning):
    sys.setswitchinterval(0.004)
    threads = torch.get_num_threads()
    profile = DeviceProfile.for_device("cuda:1")
    profile.apply()
    assert sys.getswitchinterval() == pytest.approx(0.004)  # left alone
    assert torch.get_num_threads() == threads
    assert profile.offline_yield == 0 and profile.ray_env() == {}


def test_the_cpu_profile_shares_the_cores(restore_host_tuning):
    profile = DeviceProfile.for_device("cpu", cpus=1)
    profile.apply()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert torch.get_num_threads() == 1
    assert profile.offline_yield > 0 and profile.ray_env() == {"RAY_worker_niceness": "0"}
    sim = DeviceProfile.for_device("sim:h100-8b")
    assert sim.offline_yield == 0 and sim.torch_threads is None and sim.switch_interval_s == 0.0005
    with pytest.raises(ValueError, match="device must be"):
        DeviceProfile.for_device("tpu")
