"""`harvest bench prefix`: what the prefix cache and the prefix-aware offline order buy.

Offline: each job as one batch of offline requests on two engines built from one tiny
model: the prefix cache on, with the prompts in the order the worker gives a leased
shard (sorted by token ids, one per shared prefix first), against the cache off in input
order. The engine alone, not the queue around it: the queue's cost is `harvest bench
queue`'s, and on a loaded 2-core box its polling adds noise that hides the ratio. Jobs:
- few-shot eval: the bundled MC questions behind a block of solved examples (one shared prefix);
- classify: the bundled tickets behind one long instruction with label definitions;
- unshared: prompts of the same lengths with no common prefix (the cache must cost nothing).
No prompt repeats, so dedup plays no part: only the cache and the order are measured.

Online: chat requests sharing one system prompt, one at a time (TTFT = time to the one
output token), on the same two engines.

Placement (queue/placement.py, no engine: exact counts): one job mixing the few-shot and
classify prompts line by line, with a quarter of its lines repeated at random places, cut
into shards in input order and by prompt. Per placement: the requests the shards' dedup
computes (one per distinct greedy prompt per shard) and the shards each shared prefix is
spread over (each computes it at least once).

The box is shared, so each ratio is measured side by side: cache on and off alternate
within every repeat, and the report keeps every repeat's ratio (median and spread).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from workloads.bench.common import console, print_table, write_result

DATA = Path(__file__).resolve().parents[1] / "data"
FEW_SHOT = 8  # solved examples before every eval question
INSTRUCTION = (
    "You are a support ticket classifier. Read the customer's text and answer with exactly one label. "
    "account: logins, passwords, usernames, profile settings and anything about the customer's account. "
    "billing: invoices, charges, refunds, prices, payment methods, subscriptions and plan changes. "
    "praise: thanks, compliments and positive feedback about the product, the service or the staff. "
    "shipping: deliveries, tracking numbers, parcels, addresses, couriers, delays and lost packages. "
    "technical issue: crashes, errors, bugs, slow pages, features that do not work as documented. "
    "If the text fits more than one label, pick the one the customer most wants resolved. "
)


def _prompts(kind: str) -> list[str]:
    from workloads.registry import build_requests

    if kind == "classify":
        lines = build_requests("classify", DATA / "classify_tickets.csv", model="bench")
        return [INSTRUCTION + line["body"]["prompt"] for line in lines]
    lines = build_requests("mc_eval", DATA / "mc_questions.jsonl", model="bench")
    prompts = [line["body"]["prompt"] for line in lines]
    shots = "".join(p + " " + "ABCD"[i % 4] + "\n\n" for i, p in enumerate(prompts[:FEW_SHOT]))
    return [shots + p for p in prompts[FEW_SHOT:]]


def _unshared(prompts: list[str]) -> list[str]:
    """Same lengths, nothing in common from the first token: each prompt's words rotated."""
    out = []
    for i, p in enumerate(prompts):
        words = p.split()
        k = (7 * i + 3) % len(words)
        out.append(f"{i} " + " ".join(words[k:] + words[:k]))
    return out


def offline_rate(engine: Any, prompts: list[str], max_tokens: int, ordered: bool) -> tuple[float, float]:
    """Output tokens/s of one offline batch, and the engine's prefix hit rate during it.

    `ordered`: the order the worker gives a leased shard (`ShardRun.prepare` sorts by token
    ids, then `prefix_primers` go in first and the rest once they are done); otherwise all
    at once in input order."""
    from harvest.engine import SamplingParams
    from harvest.queue.shard import prefix_primers

    ids = [engine.tokenizer.encode(p) for p in prompts]
    groups = [ids]
    if ordered:
        ids.sort()
        first = set(prefix_primers(ids, engine.block_manager.block_size))
        primers = [p for i, p in enumerate(ids) if i in first]
        groups = [primers, [p for i, p in enumerate(ids) if i not in first]]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    queried, hit = engine.stats.prefix_queried_tokens, engine.stats.prefix_hit_tokens
    start, tokens = time.perf_counter(), 0
    for group in groups:
        tokens += sum(o.num_output_tokens for o in engine.generate(group, params)) if group else 0
    wall = time.perf_counter() - start
    queried = engine.stats.prefix_queried_tokens - queried
    return tokens / wall, (engine.stats.prefix_hit_tokens - hit) / queried if queried else 0.0


def online_ttft(engine: Any, system: str, questions: list[str]) -> list[float]:
    """TTFT of chat requests sent one at a time (a one-token answer: its latency is its TTFT)."""
    from harvest.engine import SamplingParams

    tok, ttfts = engine.tokenizer, []  # the chat template is the model's: same text on every engine
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for q in questions:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        start = time.perf_counter()
        engine.add_request(text, params, request_class="online")
        while not any(out.finished for out in engine.step()):
            pass
        ttfts.append(time.perf_counter() - start)
    return ttfts


def spread_job(per_kind: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, kind) lines: the two shared-prefix jobs interleaved, then a quarter of the lines
    copied to random places (duplicates far apart, as in a job built from several sources)."""
    pairs = zip(_prompts("mc_eval")[:per_kind], _prompts("classify")[:per_kind])
    lines = [line for few, ticket in pairs for line in ((few, "few_shot_eval"), (ticket, "classify"))]
    rng = random.Random(seed)
    for line in rng.sample(lines, len(lines) // 4):
        lines.insert(rng.randrange(len(lines) + 1), line)
    return lines


def placement_counts(lines: list[tuple[str, str]], shard_size: int, by_prompt: bool) -> dict[str, Any]:
    """What one placement of `lines` costs: shards, requests computed (a shard's dedup runs each
    distinct greedy prompt once) and, per shared prefix, the shards it is spread over."""
    from harvest.queue.inputs import COMPLETIONS, RequestSpec
    from harvest.queue.placement import Placement

    placement = Placement(shard_size, by_prompt)
    for prompt, _ in lines:
        placement.add(RequestSpec("", COMPLETIONS, {"max_tokens": 2, "temperature": 0}, prompt))
    shards = list(placement.shards())
    kinds = sorted({kind for _, kind in lines})
    return {
        "lines": len(lines),
        "shards": len(shards),
        "computed_requests": sum(len({lines[i][0] for i in shard}) for shard in shards),
        "distinct_requests": len({prompt for prompt, _ in lines}),
        "prefix_shards": {k: sum(any(lines[i][1] == k for i in shard) for shard in shards) for k in kinds},
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _spread(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def run(quick: bool, out: Path) -> dict:
    import transformers
    from rich.progress import Progress

    from harvest.engine import Engine
    from harvest.models.tiny import make_tiny

    transformers.logging.set_verbosity_error()
    cfg = (
        dict(hidden=64, layers=2, repeats=3, max_tokens=2, online=8, prompts=16, placement_per_kind=16)
        if quick
        else dict(hidden=256, layers=4, repeats=3, max_tokens=4, online=32, prompts=64, placement_per_kind=32)
    )
    cfg["shard_size"] = 16  # the placement job's (harvest submit's default is 64)
    n = cfg["prompts"]
    jobs = {"few_shot_eval": _prompts("mc_eval")[:n], "classify": _prompts("classify")[:n]}
    jobs["unshared"] = _unshared(jobs["few_shot_eval"][: n // 2] + jobs["classify"][: n // 2])
    rates: dict[str, dict[str, list[float]]] = {j: {"on": [], "off": []} for j in jobs}
    hit_rates: dict[str, list[float]] = {j: [] for j in jobs}
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(Path(tmp) / "model", "llama", hidden=cfg["hidden"], layers=cfg["layers"])
        engines = {
            "on": Engine.from_pretrained(str(model), max_num_seqs=64, profile_latency=False),
            "off": Engine.from_pretrained(
                str(model), max_num_seqs=64, profile_latency=False, enable_prefix_caching=False
            ),
        }
        for engine in engines.values():  # warm-up: first-call costs out of the measurements
            offline_rate(engine, ["Warm-up.\n" + p for p in jobs["classify"][:8]], cfg["max_tokens"], True)
        steps = cfg["repeats"] * len(jobs) * 2 + 2
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("prefix bench", total=steps)
            for r in range(cfg["repeats"]):
                for job, prompts in jobs.items():
                    for cache in ("on", "off") if r % 2 == 0 else ("off", "on"):
                        progress.update(task, description=f"{job}, cache {cache}, repeat {r + 1}")
                        # a tag per run, shorter than a block: no run reuses an earlier run's blocks
                        tagged = [f"Run {r}{cache}.\n{p}" for p in prompts]
                        rate, hit = offline_rate(engines[cache], tagged, cfg["max_tokens"], cache == "on")
                        rates[job][cache].append(rate)
                        if cache == "on":
                            hit_rates[job].append(hit)
                        progress.advance(task)
            system = INSTRUCTION * 2
            questions = [f"Ticket {i}: where is my order?" for i in range(cfg["online"])]
            for cache, engine in engines.items():
                progress.update(task, description=f"online TTFT, cache {cache}")
                ttft[cache] = online_ttft(engine, system, questions)
                progress.advance(task)
    ratios = {j: [on / off for on, off in zip(rates[j]["on"], rates[j]["off"])] for j in jobs}
    lines = spread_job(cfg["placement_per_kind"])
    placement = {
        name: placement_counts(lines, cfg["shard_size"], by_prompt)
        for name, by_prompt in (("input_order", False), ("by_prompt", True))
    }
    shared = ratios["few_shot_eval"] + ratios["classify"]
    result = {
        "shared_speedup": statistics.median(shared),
        "unshared_speedup": statistics.median(ratios["unshared"]),
        "hit_rate": statistics.median(hit_rates["few_shot_eval"] + hit_rates["classify"]),
        "speedup": {j: _spread(v) for j, v in ratios.items()},
        "hit_rates": hit_rates,
        "offline_tokens_per_s": rates,
        "online_ttft_s": {
            c: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99), "samples": len(v)} for c, v in ttft.items()
        },
        "placement": placement,
        "config": {**cfg, "quick": quick, "jobs": {j: len(p) for j, p in jobs.items()}, "few_shot": FEW_SHOT},
        "targets": {"shared_speedup": 3.0, "unshared_speedup": 0.97},
    }
    print_table(
        "prefix cache + prefix-aware order (offline output tokens/s, cache on / off)",
        ["job", "on (median)", "off (median)", "speedup (median)", "min", "max"],
        [
            [j, statistics.median(rates[j]["on"]), statistics.median(rates[j]["off"]), *_spread(v).values()]
            for j, v in ratios.items()
        ],
    )
    print_table(
        f"placement: a mixed job, far-apart duplicates ({len(lines)} lines, shards of {cfg['shard_size']})",
        ["placement", "shards", "requests computed", "distinct", "shards with the few-shot block",
         "shards with the instruction"],
        [[name, c["shards"], c["computed_requests"], c["distinct_requests"],
          c["prefix_shards"]["few_shot_eval"], c["prefix_shards"]["classify"]]
         for name, c in placement.items()],
    )  # fmt: skip
    t = result["online_ttft_s"]
    print_table(
        "online TTFT, chat with a shared system prompt (ms)",
        ["cache", "P50", "P99"],
        [[c, t[c]["p50"] * 1e3, t[c]["p99"] * 1e3] for c in t],
    )
    _plot(ratios, out / "prefix.png")
    write_result(out, "prefix", result)
    return result


def _plot(ratios: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(ratios)
    ax.bar(names, [statistics.median(v) for v in ratios.values()], color="tab:green")
    for i, v in enumerate(ratios.values()):
        ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel("offline tokens/s, cache on / off")
    ax.set_title("Prefix cache + prefix-aware order (CPU, tiny model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
