"""A fault costs exactly what caused it: a request whose forward, sampling or detokenizer
raises ends with finish reason "error", and everything else in its batches finishes exactly
as an undisturbed run would (issue 19). Faults are injected at the seams by wrapping one
function so that it raises for one request."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

import harvest.engine.engine as engine_module
from harvest.api import LocalBackend, build_app
from harvest.engine import Engine, FinishReason, RequestOutput, SamplingParams
from harvest.engine.detokenizer import Detokenizer
from harvest.queue import WorkerConfig, run_local
from harvest.serving import EngineLoop, EngineLoopError
from tests.helpers import make_engine, make_prompts, run_checked

POISON_SEED = 666  # the sampling fault hits the row drawn with this seed
POISON_STOP = "\x00poison"  # the detokenizer fault hits the request with this stop string
NAN_ERROR = "probability tensor contains either `inf`, `nan` or element < 0"
MODEL = "tiny-llama"


@dataclass
class Spec:
    """One request of a test batch."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream_text: bool = False


@dataclass
class Faults:
    """Which requests the injected faults hit (see the `faults` fixture)."""

    forward_ids: set[str] = field(default_factory=set)
    forward_after: int = 0  # ... once they have this many output tokens
    sample_position: int = 0  # the poisoned row's draws fail from this sequence position on
    forwards: int = 0  # forwards run, failed ones included


def make_specs(engine: Engine, n: int = 6, max_tokens: int = 10) -> list[Spec]:
    """Greedy and seeded requests of different lengths, every third one streaming text."""
    prompts = make_prompts(engine, [3, 9, 17, 5, 12, 24, 7, 2][:n])
    specs = []
    for i, prompt in enumerate(prompts):
        temperature = 0.0 if i % 2 else 0.9
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=100 + i, ignore_eos=True)
        specs.append(Spec(f"good-{i}", prompt, params, stream_text=i % 3 == 0))
    return specs


def add(engine: Engine, specs: list[Spec]) -> None:
    for s in specs:
        engine.add_request(s.prompt, s.params, request_id=s.request_id, stream_text=s.stream_text)


def undisturbed(engine: Engine, specs: list[Spec]) -> dict[str, RequestOutput]:
    add(engine, specs)
    return run_checked(engine)


def assert_same(got: dict[str, RequestOutput], reference: dict[str, RequestOutput]) -> None:
    for rid, ref in reference.items():
        assert got[rid].token_ids == ref.token_ids, rid
        assert got[rid].text == ref.text, rid
        assert got[rid].finish_reason is ref.finish_reason and got[rid].error is None


def assert_serves(engine: Engine, specs: list[Spec], reference: dict[str, RequestOutput]) -> None:
    """The engine takes and finishes new work as before the fault."""
    again = [Spec(f"again-{s.request_id}", s.prompt, s.params, s.stream_text) for s in specs[:2]]
    done = undisturbed(engine, again)
    assert [done[s.request_id].token_ids for s in again] == [
        reference[s.request_id].token_ids for s in specs[:2]
    ]


@pytest.fixture
def engine(tiny_model) -> Engine:
    return make_engine(tiny_model, max_num_seqs=8)  # one per test: a failed test leaves no work behind


@pytest.fixture
def faults(engine, monkeypatch) -> Faults:
    """Install the three fault seams; each fires only for the requests named in `Faults`."""
    faults = Faults()
    real_sample, real_push, real_execute = engine_module.sample, Detokenizer.push, engine.runner.execute

    def sample(logits, params, seeds, positions):
        for seed, position in zip(seeds, positions):
            if seed == POISON_SEED and position >= faults.sample_position:
                raise RuntimeError(NAN_ERROR)
        return real_sample(logits, params, seeds, positions)

    def push(self, token_id):
        if POISON_STOP in self.stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_push(self, token_id)

    def execute(requests, num_new_tokens, abort=None):
        faults.forwards += 1
        bad = [r.request_id for r in requests if r.request_id in faults.forward_ids
               and r.num_output_tokens >= faults.forward_after]  # fmt: skip
        if bad:
            raise IndexError(f"index out of range in self (tokens of {sorted(bad)})")
        return real_execute(requests, num_new_tokens, abort)

    monkeypatch.setattr(engine_module, "sample", sample)
    monkeypatch.setattr(Detokenizer, "push", push)
    monkeypatch.setattr(engine.runner, "execute", execute)
    return faults


POISONED = SamplingParams(max_tokens=10, temperature=0.8, seed=POISON_SEED, ignore_eos=True)


# ---------------------------------------------------------------------- the engine


def test_a_request_whose_sampling_raises_fails_alone(engine, faults):
    specs = make_specs(engine)
    reference = undisturbed(engine, specs)
    prompt = make_prompts(engine, [10])[0]
    faults.sample_position = len(prompt) + 2  # two tokens are out before its third draw fails
    bad = Spec("bad", prompt, POISONED, stream_text=True)
    add(engine, [*specs, bad])
    done = run_checked(engine)
    assert done["bad"].finish_reason is FinishReason.ERROR and done["bad"].finished
    assert done["bad"].error == f"RuntimeError: {NAN_ERROR}"
    assert len(done["bad"].token_ids) == 2  # the failed draw committed nothing
    assert_same(done, reference)
    assert_serves(engine, specs, reference)


def test_a_request_whose_detokenizer_raises_fails_alone(engine, faults):
    specs = make_specs(engine)
    reference = undisturbed(engine, specs)
    bad = Spec(
        "bad", make_prompts(engine, [6])[0], SamplingParams(max_tokens=8, temperature=0, stop=[POISON_STOP])
    )
    add(engine, [*specs, bad])
    done = run_checked(engine)
    assert done["bad"].finish_reason is FinishReason.ERROR
    assert done["bad"].error.startswith("UnicodeDecodeError: ") and done["bad"].token_ids == []
    assert_same(done, reference)
    assert_serves(engine, specs, reference)


@pytest.mark.parametrize("after_tokens", [0, 3], ids=["in-prefill", "mid-decode"])
def test_requests_whose_forward_raises_are_bisected_out(engine, faults, after_tokens):
    specs = make_specs(engine, n=8)
    reference = undisturbed(engine, specs)
    culprits = {"good-2", "good-5"}  # two among eight: both found by bisection
    faults.forward_ids, faults.forward_after = culprits, after_tokens
    add(engine, specs)
    done = run_checked(engine)
    for rid in culprits:
        assert done[rid].finish_reason is FinishReason.ERROR and "index out of range" in done[rid].error
        assert done[rid].token_ids == reference[rid].token_ids[:after_tokens]
    assert_same(done, {rid: out for rid, out in reference.items() if rid not in culprits})
    faults.forward_ids = set()
    assert_serves(engine, specs, reference)


def test_a_lone_culprit_is_blamed_once_a_probe_shows_the_engine_works(engine, faults):
    """No other request to compare with: a one-token probe tells a bad request from a bad engine."""
    faults.forward_ids = {"alone"}
    engine.add_request(make_prompts(engine, [5])[0], SamplingParams(max_tokens=4, temperature=0), "alone")
    done = run_checked(engine)
    assert done["alone"].finish_reason is FinishReason.ERROR


@pytest.mark.parametrize("min_batch", [1, 3], ids=["every-forward", "only-whole-batches"])
def test_a_fault_no_request_explains_is_raised_with_nothing_committed(engine, monkeypatch, min_batch):
    """Every request fails alone, or the batch fails only as a whole: not a request's fault."""
    specs = make_specs(engine, n=4)

    def broken(requests, num_new_tokens, abort=None):
        if len(requests) >= min_batch:
            raise RuntimeError("the model is broken")
        return real(requests, num_new_tokens, abort)

    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", broken)
    add(engine, specs)
    with pytest.raises(RuntimeError, match="the model is broken"):
        engine.step()
    unfinished = engine.scheduler.unfinished()
    assert len(unfinished) == 4 and all(
        r.num_computed_tokens == 0 and r.num_output_tokens == 0 for r in unfinished
    )
    engine.block_manager.check_integrity(unfinished)
    for s in specs:
        engine.abort(s.request_id)
    monkeypatch.undo()
    aborted = run_checked(engine)
    assert {o.finish_reason for o in aborted.values()} == {FinishReason.ABORT}


def test_out_of_memory_is_the_engines_fault_without_a_search(engine, faults, monkeypatch):
    real = engine.runner.execute

    def out_of_memory(requests, num_new_tokens, abort=None):
        if any(r.request_id == "huge" for r in requests):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(requests, num_new_tokens, abort)

    monkeypatch.setattr(engine.runner, "execute", out_of_memory)
    add(engine, make_specs(engine, n=2))
    engine.add_request(make_prompts(engine, [5])[0], SamplingParams(max_tokens=2), "huge")
    forwards = faults.forwards
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    assert faults.forwards == forwards  # no halves were re-run
    for rid in ("good-0", "good-1", "huge"):
        engine.abort(rid)
    monkeypatch.setattr(engine.runner, "execute", real)
    run_checked(engine)


# ---------------------------------------------------------------------- the engine loop


class Finished:
    """Sink callbacks remembering each request's final output or loop error."""

    def __init__(self, expected: int) -> None:
        self.outputs: dict[str, RequestOutput | BaseException] = {}
        self.expected = expected
        self.all = threading.Event()
        self.lock = threading.Lock()

    def sink(self, request_id: str) -> dict:
        def done(item: RequestOutput | BaseException) -> None:
            if isinstance(item, RequestOutput) and not item.finished:
                return
            with self.lock:
                self.outputs[request_id] = item
                if len(self.outputs) == self.expected:
                    self.all.set()

        return {"on_output": done, "on_error": done}


def test_loop_routes_a_culprits_error_and_stays_healthy(engine, faults, loops):
    specs = make_specs(engine)
    reference = undisturbed(engine, specs)
    prompt = make_prompts(engine, [10])[0]
    bad = Spec("bad", prompt, POISONED)
    loop = EngineLoop(engine)
    loops.append(loop)
    finished = Finished(len(specs) + 1)
    for s in [*specs, bad]:
        loop.submit(
            s.prompt,
            s.params,
            s.request_id,
            "online",
            stream_text=s.stream_text,
            **finished.sink(s.request_id),
        )
    assert finished.all.wait(60)
    assert finished.outputs["bad"].finish_reason is FinishReason.ERROR
    assert_same({rid: out for rid, out in finished.outputs.items() if rid != "bad"}, reference)
    assert loop.healthy() and loop.stats()["error"] is None
    assert loop.stats()["finished"]["error"] == 1


def test_loop_stopped_by_an_engine_fault_is_unhealthy_at_once(engine, loops, monkeypatch):
    def dead(requests, num_new_tokens, abort=None):
        raise RuntimeError("device gone")

    monkeypatch.setattr(engine.runner, "execute", dead)
    loop = EngineLoop(engine)
    loops.append(loop)
    specs = make_specs(engine, n=3)
    finished = Finished(len(specs))
    for s in specs:
        loop.submit(s.prompt, s.params, s.request_id, **finished.sink(s.request_id))
    assert finished.all.wait(60)
    assert all(isinstance(e, EngineLoopError) and "device gone" in str(e) for e in finished.outputs.values())
    assert not loop.healthy()
    assert "device gone" in loop.stats()["error"]
    monkeypatch.undo()
    assert loop.stop(timeout=30)
    left = run_checked(engine)  # the dead loop aborted what it held, for whoever steps the engine next
    assert {o.finish_reason for o in left.values()} == {FinishReason.ABORT}


# ---------------------------------------------------------------------- HTTP


@pytest.fixture
def api(engine) -> Iterator[SimpleNamespace]:
    loop = EngineLoop(engine)
    with TestClient(build_app(LocalBackend(loop, MODEL))) as client:
        yield SimpleNamespace(client=client, loop=loop)
    loop.stop(timeout=30)


def poisoned_body(prompt: list[int], stream: bool) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0.8, "seed": POISON_SEED,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def sse_events(text: str) -> list:
    data = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_failing_on_its_first_token_answers_500(engine, faults, api, stream):
    r = api.client.post("/v1/completions", json=poisoned_body(make_prompts(engine, [10])[0], stream))
    assert r.status_code == 500
    error = r.json()["error"]
    assert (
        error["type"] == "server_error" and error["code"] == "engine_error" and NAN_ERROR in error["message"]
    )
    assert api.client.get("/health").status_code == 200
    ok = api.client.post("/v1/completions", json={"model": MODEL, "prompt": "The miller", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_stream_failing_part_way_ends_with_an_error_event(engine, faults, api):
    prompt = make_prompts(engine, [10])[0]
    faults.sample_position = len(prompt) + 4
    r = api.client.post("/v1/completions", json=poisoned_body(prompt, stream=True))
    assert r.status_code == 200  # the first token came before the fault
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (
        error["type"] == "server_error" and error["code"] == "engine_error" and NAN_ERROR in error["message"]
    )
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert api.client.get("/health").status_code == 200
    assert api.loop.stats()["finished"]["error"] == 1


# ---------------------------------------------------------------------- offline


def test_a_poison_batch_line_gets_one_error_record(queue_client, queue_engine, monkeypatch):
    real_sample = engine_module.sample

    def sample(logits, params, seeds, positions):
        if POISON_SEED in seeds:
            raise RuntimeError(NAN_ERROR)
        return real_sample(logits, params, seeds, positions)

    monkeypatch.setattr(engine_module, "sample", sample)
    prompts = ["The miller", "Once upon a time", "To make bread", "The river"]
    body = {"prompt": "A poison line", "max_tokens": 6, "temperature": 0.8, "seed": POISON_SEED}
    poison = {"custom_id": "poison", "method": "POST", "url": "/v1/completions", "body": body}
    job = queue_client.submit([*prompts[:2], poison, *prompts[2:]], max_tokens=6, temperature=0, shard_size=5)
    run_local(queue_client.store, queue_engine, WorkerConfig(), exit_when_idle=True)
    job = queue_client.wait(job.id, timeout=5, progress=False)
    assert (job.request_counts.completed, job.request_counts.failed) == (4, 1)
    rows = queue_client.results(job.id).to_pylist()
    assert [r["custom_id"] for r in rows] == ["request-0", "request-1", "poison", "request-3", "request-4"]
    bad = rows[2]
    assert (
        bad["status"] == "failed"
        and bad["error_code"] == "engine_error"
        and NAN_ERROR in bad["error_message"]
    )
    expected = queue_engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [r["output_token_ids"] for r in rows if r["custom_id"] != "poison"] == [
        o.token_ids for o in expected
    ]
