"""Co-serving on the simulated GPU in virtual time: the clock, a step's time and its layer
abort, and `harvest bench coserve --device sim:PROFILE`'s policies ordered as the design says."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from harvest.cli import app
from harvest.engine import SamplingParams
from harvest.engine.clock import VirtualClock
from harvest.engine.sim_profile import FITTED, PROFILES, profile_for
from tests.helpers import make_engine, make_prompts
from workloads.replay import random_prompt, replay
from workloads.traces import gamma_arrivals

DEVICE = "sim:h100-8b"
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_virtual_clock_runs_events_in_time_order_as_it_sleeps():
    clock, fired = VirtualClock(), []
    for when in (0.3, 0.1, 0.2):
        clock.call_at(when, lambda when=when: fired.append((when, clock.now())))
    clock.sleep(0.25)
    assert fired == [(0.1, 0.1), (0.2, 0.2)] and clock.now() == 0.25
    assert clock.next_event() == 0.3
    clock.advance_to(0.1)  # never backwards
    assert clock.now() == 0.25


def test_a_virtual_step_takes_exactly_the_profiles_time(tiny_model):
    clock = VirtualClock()
    engine = make_engine(tiny_model, device=DEVICE, clock=clock, block_size=16)
    engine.add_request(make_prompts(engine, [40])[0], GREEDY)
    for _ in range(3):  # the prefill, two decodes
        engine.step()
        assert engine.last_step.measured_latency_s > 6e-3  # an 8B step on an H100
    # the host's scheduling and sampling took no device time, however busy the box
    assert clock.now() == pytest.approx(engine.runner.device_s, rel=1e-9)


def test_an_arrival_in_virtual_time_aborts_an_offline_step_at_a_layer_boundary(tiny_model):
    clock = VirtualClock()
    engine = make_engine(tiny_model, device=DEVICE, clock=clock, block_size=16, policy="harvest")
    engine.add_request(make_prompts(engine, [200])[0], GREEDY, request_id="offline")
    online = make_prompts(engine, [10], start=300)[0]

    def arrive() -> None:
        engine.add_request(online, GREEDY, request_id="online", request_class="online")

    clock.call_at(2e-3, arrive)
    engine.step()  # offline-only prefill (~12 ms by the profile), cut short after the arrival
    assert engine.last_step.aborted and engine.stats.aborted_steps == 1
    assert 2e-3 <= clock.now() < 2e-3 + 1.5e-3  # the next poll after the arrival
    outputs = {}
    while engine.has_unfinished():
        outputs |= {o.request_id: o for o in engine.step() if o.finished}
    assert set(outputs) == {"offline", "online"}
    assert outputs["online"].metrics["arrival_time"] == 2e-3


def test_a_trace_in_virtual_time_replays_the_same_with_checkpoint_loads(tiny_model):
    """Preempted offline requests come back from their checkpoints (a load) in every run, and
    two runs of one trace take the same steps: a load lands in the step it was started in, not
    whenever a thread gets to it (that made `sim:fit` repeats differ)."""
    arrivals = gamma_arrivals(40.0, 2.0, num_requests=30, prompt_len="lognormal:96:0.5:384",
                              output_len="lognormal:32:0.5:96", seed=1)  # fmt: skip
    rng = random.Random(2)
    backlog = [(random_prompt(rng.randint(100, 500), 500, rng), rng.randint(20, 120)) for _ in range(80)]
    runs = []
    for _ in range(2):
        clock = VirtualClock()
        engine = make_engine(tiny_model, device=DEVICE, clock=clock, policy="harvest", block_size=16,
                             num_blocks=300, slo={"ttft_s": 0.2, "tpot_s": 0.02})  # fmt: skip
        run = replay(engine, arrivals, backlog, 500, clock=clock)
        assert engine.stats.preemptions > 0 and engine.stats.restored_tokens > 0
        runs.append([(t["time"], t["offline_tokens"], t["restored_tokens"]) for t in run.timeline])
    assert runs[0] == runs[1]


def test_only_the_simulated_device_runs_on_a_virtual_clock(tiny_model):
    with pytest.raises(ValueError, match="virtual clock"):
        make_engine(tiny_model, clock=VirtualClock())


def test_only_coserve_takes_the_simulated_device(tmp_path):
    result = CliRunner().invoke(app, ["bench", "engine", "--device", DEVICE, "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "only the coserve suite runs on the simulated" in result.output


def test_bench_coserve_quick_on_the_simulated_gpu(tmp_path):
    """~10 s of CPU; in virtual time, so the policies' order does not depend on the box's load."""
    args = ["bench", "coserve", "--quick", "--device", DEVICE, "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SIMULATED on h100-8b" in result.output
    data = json.loads((tmp_path / "coserve-h100-8b.json").read_text())
    assert data["simulated_device"]["profile"] == "h100-8b"
    assert data["config"]["max_num_seqs"] == 64
    p, slo = data["policies"], data["slo"]
    base, harvest, prio, fcfs = p["online-only"], p["harvest"], p["priority-recompute"], p["fcfs"]
    # an 8B decode step is nearly flat in batch size: offline work multiplies the tokens made
    assert harvest["offline_tokens_per_s"] > 10 * base["total_tokens_per_s"]
    assert harvest["offline_tokens_per_s"] > 0.5 * fcfs["offline_tokens_per_s"]
    # ... while online requests keep their latency, which the other two policies do not
    assert harvest["ttft_p99_s"] <= 1.5 * base["ttft_p99_s"]
    assert harvest["tpot_p99_s"] <= slo["tpot_s"] < prio["tpot_p99_s"]
    assert harvest["slo_attainment"] >= 0.9 > max(prio["slo_attainment"], fcfs["slo_attainment"])
    assert fcfs["ttft_p99_s"] > 10 * harvest["ttft_p99_s"]
    for plot in ("latency_cdf", "throughput", "budget"):
        assert (tmp_path / f"coserve-h100-8b_{plot}.png").stat().st_size > 0


def test_bench_coserve_quick_on_this_hosts_fitted_profile(tmp_path):
    """`sim:fit`: the profile the engine's start-up fit finds here, the CPU run's engine size,
    virtual time. Every step takes exactly what that profile predicts for its shape."""
    args = ["bench", "coserve", "--quick", "--device", "sim:fit", "--seed", "3", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "SIMULATED on fit" in result.output
    data = json.loads((tmp_path / "coserve-fit.json").read_text())
    assert data["simulated_device"]["profile"] == "fit"
    assert "on this host" in data["simulated_device"]["source"]
    assert data["config"]["max_num_seqs"] == 32 and data["config"]["seed"] == 3  # the CPU run's size
    # harvest fits its latency model at start, in virtual time: to the profile itself
    timeline = json.loads((tmp_path / "coserve-fit_timeline.json").read_text())["harvest"]
    steps = [(s["measured_latency_s"], s["predicted_latency_s"]) for s in timeline if not s["aborted"]]
    assert steps and all(m == pytest.approx(p, rel=1e-3) for m, p in steps)
    p = data["policies"]
    assert p["harvest"]["offline_tokens_per_s"] > 0 and p["online-only"]["slo_attainment"] > 0.5


def test_sim_fit_needs_a_fitted_profile_and_seed_is_coserves(tmp_path):
    saved = PROFILES.pop(FITTED, None)  # another test may have fitted one in this process
    try:
        with pytest.raises(ValueError, match="no profile has been fitted"):
            profile_for("sim:fit")
    finally:
        if saved is not None:
            PROFILES[FITTED] = saved
    result = CliRunner().invoke(app, ["bench", "engine", "--seed", "1", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "only the coserve suite takes --seed" in result.output
