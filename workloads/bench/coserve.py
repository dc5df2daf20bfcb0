"""`harvest bench coserve`: the four policies on the same online trace and offline backlog.

One process, one model, one machine, run back to back:
1. calibration: the service time of one online request on an idle engine sets the default
   online rate, so that `online-only` is busy about 30% of the time;
2. `online-only`, whose P99 TTFT and P50 TPOT set the SLOs (1.2x and 2x, overridable);
3. `fcfs`, `priority-recompute` and `harvest` with the same trace plus an offline backlog of
   5x as many requests queued at t=0;
4. `saturated_tokens_per_s`: offline alone at the best batch.

On the simulated device (`--device sim[:PROFILE]`, harvest/engine/sim_runner.py) the same
run puts the real scheduler over steps that sleep for what the profile predicts (e.g. an 8B
model on one H100), with the engine sized as on that GPU (`SIM`): a simulation from the
profile's derived numbers, not a measurement. It runs in virtual time
(harvest/engine/clock.py): a step takes exactly the profile's time however busy this box
is, and the host's scheduling and sampling cost no device time. The results go to
coserve-PROFILE.json.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harvest.engine import Engine
from harvest.engine.clock import WALL, VirtualClock
from harvest.engine.sim_profile import FITTED, profile_for, register_fitted
from workloads.bench.common import console, print_table, write_result
from workloads.bench.plots import plot_coserve
from workloads.replay import ReplayRun, random_prompt, replay
from workloads.stats import latency_percentiles
from workloads.traces import gamma_arrivals

POLICIES = ("online-only", "fcfs", "priority-recompute", "harvest")
# CI-sized: a smaller model, fewer and shorter requests (under 3 minutes on 2 cores)
QUICK = dict(
    num_online=20,
    hidden=128,
    layers=4,
    heads=4,
    online_output="lognormal:16:0.5:48",
    offline_output="lognormal:48:0.5:128",
    offline_prompt="lognormal:192:0.5:512",
)
# The engine on the simulated GPU, sized as one 80 GB GPU serving an 8B model: KV for
# (0.9 x 80 GB - 16 GB of weights - ~4 GB of activations) / 128 KiB a token = ~400k tokens;
# 64 seats (the engine's default, and `bench scale`'s; vLLM V1's are 256-1024); 2048 tokens a
# step (vLLM V1's API-server default below H100 class; 8192 on an H100). The trace and the
# offline lengths are the CPU run's; the backlog is 10x longer, since the simulated GPU would
# finish the CPU's 5x before the trace ends.
SIM = dict(num_blocks=24_000, max_num_seqs=64, max_num_batched_tokens=2048, backlog_factor=50)


@dataclass
class CoserveConfig:
    num_online: int = 200
    rate: float | None = None  # online requests/s; None: calibrated to ~30% busy
    target_busy: float = 0.3
    cv: float = 2.0
    backlog_factor: int = 5
    online_prompt: str = "lognormal:96:0.5:384"
    online_output: str = "lognormal:32:0.5:96"
    offline_prompt: str = "lognormal:256:0.5:768"
    offline_output: str = "lognormal:96:0.5:256"
    ttft_slo_s: float | None = None  # None: 1.2x online-only P99 TTFT
    tpot_slo_s: float | None = None  # None: 2x online-only P50 TPOT
    hidden: int = 192
    layers: int = 6
    heads: int = 6
    block_size: int = 16
    num_blocks: int = 512
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    seed: int = 0
    model: str | None = None  # a model directory instead of the built tiny one
    device: str = "cpu"  # or cuda[:N]: then the checkpoint's dtype; or sim[:PROFILE]

    @property
    def simulated(self) -> bool:
        return self.device == "sim" or self.device.startswith("sim:")

    @property
    def fitted(self) -> bool:
        """`sim:fit`: simulated on this host's own step costs, at the CPU run's engine size."""
        return self.device == f"sim:{FITTED}"


def summarize(run: ReplayRun, ttft_slo: float | None, tpot_slo: float | None, engine: Engine) -> dict:
    ttft = [r.ttft_s for r in run.online]
    tpot = [r.tpot_s for r in run.online if r.tpot_s is not None]
    ok = [
        not r.censored and r.ttft_s <= ttft_slo and (r.tpot_s is None or r.tpot_s <= tpot_slo)
        for r in run.online
        if ttft_slo is not None
    ]
    missed = [r for r, good in zip(run.online, ok) if not good]
    return {
        # each miss by how far past its targets, to find in the step timeline (NAME_timeline.json)
        "misses": [
            {
                "index": r.index,
                "arrival_s": r.arrival_s,
                "ttft_x": r.ttft_s / ttft_slo,
                "tpot_x": None if r.tpot_s is None else r.tpot_s / tpot_slo,
                "output_tokens": r.output_tokens,
                "censored": r.censored,
            }
            for r in sorted(missed, key=lambda r: r.arrival_s)
        ],
        **latency_percentiles(ttft, tpot),
        "slo_attainment": sum(ok) / len(ok) if ok else float("nan"),
        "online_tokens_per_s": run.online_tokens / run.duration_s,
        "offline_tokens_per_s": run.offline_tokens / run.duration_s,
        "total_tokens_per_s": (run.online_tokens + run.offline_tokens) / run.duration_s,
        "preemptions": engine.stats.preemptions,
        "recomputed_tokens": engine.stats.recomputed_tokens,
        "restored_tokens": engine.stats.restored_tokens,
        "aborted_steps": engine.stats.aborted_steps,
        "busy_fraction": run.busy_s / run.duration_s,
        "duration_s": run.duration_s,
        "num_online": len(run.online),
        "num_online_unfinished": sum(r.censored for r in run.online),
    }


def make_engine(model_dir: Path, cfg: CoserveConfig, policy: str, slo: dict | None = None) -> Engine:
    return Engine.from_pretrained(
        str(model_dir),
        clock=VirtualClock() if cfg.simulated else WALL,
        policy=policy,
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        device=cfg.device,
        dtype="float32" if cfg.device == "cpu" else "auto",
        **({"slo": slo} if slo else {}),
    )


def fit_profile(model_dir: Path, cfg: CoserveConfig) -> None:
    """Register `sim:fit`: what the engine's start-up profile of this model finds on this host."""
    engine = make_engine(model_dir, replace(cfg, device="cpu"), "harvest")  # harvest profiles at start
    model = cfg.model or "the tiny Llama"
    source = f"fitted at start-up: Engine.profile_latency of {model} on this host's cpu"
    register_fitted(engine.latency.weights, engine.runner.shape.num_layers, source)


def calibrate_rate(model_dir: Path, cfg: CoserveConfig, vocab: int) -> float:
    """Requests/s at which an online-only engine would be busy `target_busy` of the time."""
    engine = make_engine(model_dir, cfg, "online-only")
    probe = gamma_arrivals(
        1.0,
        0.0,
        num_requests=8,
        prompt_len=cfg.online_prompt,
        output_len=cfg.online_output,
        seed=cfg.seed + 1,
    )
    rng = random.Random(cfg.seed)
    times = []
    for a in probe:
        from harvest.engine import SamplingParams

        params = SamplingParams(max_tokens=a.output_tokens, temperature=0, ignore_eos=True)
        start = engine.clock.now()
        engine.add_request(random_prompt(a.prompt_tokens, vocab, rng), params, request_class="online")
        while engine.has_unfinished():
            engine.step()
        times.append(engine.clock.now() - start)
    return cfg.target_busy / statistics.median(times[2:])  # first ones warm up


def saturated_rate(model_dir: Path, cfg: CoserveConfig, backlog, seconds: float) -> float:
    engine = make_engine(model_dir, cfg, "harvest")
    from harvest.engine import SamplingParams

    for prompt, n in backlog:
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    now = engine.clock.now
    before, start = engine.stats.generated_offline, now()
    while now() - start < seconds and engine.has_unfinished():
        engine.step()
    return (engine.stats.generated_offline - before) / (now() - start)


def run(quick: bool, out: Path, **overrides) -> dict:
    import transformers
    from rich.progress import Progress

    from harvest.models.tiny import make_tiny
    from workloads.lengths import LengthDist

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    cfg = CoserveConfig(**{**(QUICK if quick else {}), **overrides})
    if cfg.simulated and not cfg.fitted:  # the engine sized as on the GPU the profile stands for
        cfg = replace(cfg, **{k: v for k, v in SIM.items() if k not in overrides})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(cfg.model)
            if cfg.model
            else make_tiny(
                Path(tmp) / "coserve-llama", "llama", hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads
            )
        )
        if cfg.fitted:
            fit_profile(model_dir, cfg)
        vocab = 500
        rate = cfg.rate or calibrate_rate(model_dir, cfg, vocab)
        arrivals = gamma_arrivals(
            rate,
            cfg.cv,
            num_requests=cfg.num_online,
            prompt_len=cfg.online_prompt,
            output_len=cfg.online_output,
            seed=cfg.seed,
        )
        rng = random.Random(cfg.seed + 2)
        p_dist, o_dist = LengthDist.parse(cfg.offline_prompt), LengthDist.parse(cfg.offline_output)
        backlog = [
            (random_prompt(p_dist.sample(rng), vocab, rng), o_dist.sample(rng))
            for _ in range(cfg.backlog_factor * cfg.num_online)
        ]
        results: dict[str, dict] = {}
        timelines: dict[str, list[dict]] = {}
        online_latency: dict[str, dict[str, list[float]]] = {}
        slo: dict | None = None
        with Progress(console=console, transient=True) as progress:
            for policy in POLICIES:
                task = progress.add_task(f"{policy}: online requests done", total=len(arrivals))
                engine = make_engine(model_dir, cfg, policy, slo)
                run_ = replay(
                    engine,
                    arrivals,
                    [] if policy == "online-only" else backlog,
                    vocab,
                    cfg.seed,
                    on_step=lambda done, task=task: progress.update(task, completed=done),
                    clock=engine.clock if cfg.simulated else None,
                )
                progress.update(task, completed=len(arrivals))
                if policy == "online-only":
                    base = summarize(run_, None, None, engine)
                    slo = {
                        "ttft_s": cfg.ttft_slo_s or 1.2 * base["ttft_p99_s"],
                        "tpot_s": cfg.tpot_slo_s or 2.0 * base["tpot_p50_s"],
                    }
                results[policy] = summarize(run_, slo["ttft_s"], slo["tpot_s"], engine)
                timelines[policy] = run_.timeline
                online_latency[policy] = {
                    "ttft_s": [r.ttft_s for r in run_.online],
                    "tpot_s": [r.tpot_s for r in run_.online if r.tpot_s is not None],
                }
            progress.add_task("saturated offline throughput", total=None)
            saturated = saturated_rate(model_dir, cfg, backlog, 5.0 if quick else 15.0)
    result = {
        "slo": slo,
        "online_rate_rps": rate,
        "saturated_tokens_per_s": saturated,
        "policies": results,
        "targets": evaluate_targets(results),
        "harvested": harvested(results, saturated),
        "config": {**asdict(cfg), "quick": quick},
        "online_latency": online_latency,
    }
    name, note = "coserve", ""
    if cfg.simulated:
        profile = profile_for(cfg.device)
        name, note = f"coserve-{profile.name}", f" (simulated {profile.name})"
        result["simulated_device"] = {
            "profile": profile.name,
            "weights": profile.weights,
            "source": profile.source,
            "note": "a simulation: steps sleep for what the profile predicts; not a GPU measurement",
        }
    _print(result)
    plot_coserve(timelines, online_latency, slo, out, prefix=name, note=note)
    write_result(out, name, result)
    # every step of every policy (time from the run's start), for the misses above
    (out / f"{name}_timeline.json").write_text(json.dumps(timelines))
    return result


def harvested(r: dict[str, dict], saturated: float) -> dict:
    """harvest's offline throughput against what the device had to spare: offline alone at
    the best batch, and that scaled to the time online-only leaves the device idle. Above 1
    for the latter, offline work rode along in online steps (nearly free where a step's time
    is flat in batch size, as on a GPU)."""
    offline = r["harvest"]["offline_tokens_per_s"]
    idle = (1 - r["online-only"]["busy_fraction"]) * saturated
    return {
        "offline_vs_saturated": offline / saturated,
        "idle_capacity_tokens_per_s": idle,
        "offline_vs_idle_capacity": offline / idle if idle > 0 else float("nan"),
    }


def evaluate_targets(r: dict[str, dict]) -> dict[str, dict]:
    """The co-serving issue's targets for `harvest`, each with the measured ratio and met/not."""
    h, base, fcfs, prio = r["harvest"], r["online-only"], r["fcfs"], r["priority-recompute"]

    def target(value: float, bound: float, at_most: bool) -> dict:
        met = value <= bound if at_most else value >= bound
        return {"value": value, "bound": bound, "met": bool(met)}

    return {
        "ttft_p99_vs_online_only": target(h["ttft_p99_s"] / base["ttft_p99_s"], 1.2, at_most=True),
        "slo_attainment": target(h["slo_attainment"], 0.99, at_most=False),
        "total_throughput_vs_online_only": target(
            h["total_tokens_per_s"] / base["total_tokens_per_s"], 2.35, at_most=False
        ),
        "total_throughput_vs_fcfs": target(
            h["total_tokens_per_s"] / fcfs["total_tokens_per_s"], 0.8, at_most=False
        ),
        "fcfs_ttft_p99_over_harvest": target(fcfs["ttft_p99_s"] / h["ttft_p99_s"], 10.0, at_most=False),
        "recomputed_vs_priority_recompute": target(
            h["recomputed_tokens"] / max(1, prio["recomputed_tokens"]), 0.10, at_most=True
        ),
    }


def _print(result: dict) -> None:
    cols = [
        "policy",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "SLO att.",
        "online tok/s",
        "offline tok/s",
        "total tok/s",
        "preempt",
        "recomputed",
    ]
    rows = [
        [
            name,
            p["ttft_p50_s"],
            p["ttft_p99_s"],
            p["tpot_p50_s"],
            p["tpot_p99_s"],
            p["slo_attainment"],
            p["online_tokens_per_s"],
            p["offline_tokens_per_s"],
            p["total_tokens_per_s"],
            p["preemptions"],
            p["recomputed_tokens"],
        ]
        for name, p in result["policies"].items()
    ]
    slo = result["slo"]
    sim = result.get("simulated_device")
    where = f"SIMULATED on {sim['profile']}, not measured; " if sim else ""
    print_table(
        f"coserve ({where}SLO: TTFT {slo['ttft_s'] * 1e3:.1f} ms, TPOT {slo['tpot_s'] * 1e3:.1f} ms; "
        f"online rate {result['online_rate_rps']:.2f} req/s)",
        cols,
        rows,
    )
    print_table(
        "harvest targets",
        ["target", "value", "bound", "met"],
        [[k, v["value"], v["bound"], "yes" if v["met"] else "NO"] for k, v in result["targets"].items()],
    )
    h = result["harvested"]
    console.print(
        f"saturated offline throughput: {result['saturated_tokens_per_s']:.0f} tok/s; harvest's offline "
        f"throughput is {h['offline_vs_saturated']:.2f}x that and {h['offline_vs_idle_capacity']:.2f}x "
        "what online-only leaves idle"
    )
