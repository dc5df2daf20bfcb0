"""PNG plots for the co-serving benchmarks: latency CDFs, throughput over time, offline budget,
harvested work per tenant."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

COLORS = {
    "online-only": "tab:gray",
    "fcfs": "tab:red",
    "priority-recompute": "tab:orange",
    "harvest": "tab:green",
}


def _cdf(ax, values: list[float], label: str, color: str | None) -> None:
    if not values:
        return
    xs = sorted(v * 1e3 for v in values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, color=color)


def _ms_label(x: float, _pos) -> str:
    """Log-axis tick labels in plain ms, on 1, 2 and 5 of each decade only (no overlaps)."""
    if x <= 0:
        return ""
    lead = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
    return f"{x:g}" if lead in (1, 2, 5) else ""


def plot_latency_cdfs(
    latency: dict[str, dict[str, list[float]]], slo: dict | None, path: Path, note: str = ""
) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in latency.items():
        _cdf(axes[0], values["ttft_s"], name, COLORS.get(name))
        _cdf(axes[1], values["tpot_s"], name, COLORS.get(name))
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT (mean per request)")):
        if slo:
            ax.axvline(slo[key] * 1e3, color="black", linestyle="--", linewidth=1, label="SLO")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_ms_label))
        ax.xaxis.set_minor_formatter(FuncFormatter(_ms_label))
        ax.set_xlabel(f"{title} (ms, log)")
        ax.set_ylabel("fraction of online requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Online latency CDFs{note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bins(timeline: list[dict], key: str, width: float) -> tuple[list[float], list[float]]:
    if not timeline:
        return [], []
    n = int(timeline[-1]["time"] // width) + 1
    sums = [0.0] * n
    for step in timeline:
        sums[int(max(step["time"], 0) // width)] += step[key]
    return [i * width for i in range(n)], [s / width for s in sums]


def plot_throughput(timelines: dict[str, list[dict]], path: Path, width: float = 1.0, note: str = "") -> None:
    names = [n for n in timelines if n != "online-only"] or list(timelines)
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        t, online = _bins(timelines[name], "online_tokens", width)
        _, offline = _bins(timelines[name], "offline_tokens", width)
        ax.stackplot(
            t,
            online,
            offline,
            labels=["online", "offline"],
            colors=["tab:blue", "tab:green"],
            alpha=0.8,
            step="post",
        )
        marks = [s["time"] for s in timelines[name] if s["preemptions"]]
        if marks:
            top = max(o + f for o, f in zip(online, offline)) or 1
            ax.plot(marks, [top * 1.02] * len(marks), "v", color="tab:red", markersize=4, label="preemption")
        ax.set_ylabel("tokens/s computed")
        ax.set_title(f"{name}{note}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budget(timeline: list[dict], path: Path, note: str = "") -> None:
    fig, ax = plt.subplots(figsize=(11, 3.5))
    t = [s["time"] for s in timeline]
    ax.plot(
        t,
        [s["offline_token_budget"] for s in timeline],
        color="tab:green",
        linewidth=0.8,
        label="offline token budget (tokens/step)",
    )
    ax.plot(
        t,
        [s["offline_tokens"] for s in timeline],
        color="tab:olive",
        linewidth=0.6,
        alpha=0.7,
        label="offline tokens scheduled",
    )
    ax.set_ylabel("tokens per step")
    ax.set_xlabel("time (s)")
    twin = ax.twinx()
    twin.plot(
        t,
        [s["online_running"] + s["online_waiting"] for s in timeline],
        color="tab:blue",
        linewidth=0.8,
        label="online requests in engine",
    )
    twin.set_ylabel("online requests")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(f"harvest: offline budget vs online load{note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coserve(
    timelines: dict[str, list[dict]],
    latency: dict,
    slo: dict | None,
    out: Path,
    prefix: str = "coserve",
    note: str = "",
) -> None:
    """`note`: appended to every title (what device, simulated or not)."""
    plot_latency_cdfs(latency, slo, out / f"{prefix}_latency_cdf.png", note)
    plot_throughput(timelines, out / f"{prefix}_throughput.png", note=note)
    if "harvest" in timelines:
        plot_budget(timelines["harvest"], out / f"{prefix}_budget.png", note)


def plot_queue(report: dict, path: Path) -> None:
    """Queue cost per request by verb, and its share of engine time per request length."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    per = report["queue"]["per_request"]
    verbs = ["enqueue", "lease", "write", "ack"]
    left.bar(verbs, [per[f"{v}_us"] for v in verbs], color="tab:blue")
    left.set_ylabel("µs per request")
    left.set_title("queue verbs, instant fake results")
    runs = list(report["engine"]["runs"].values())
    labels = [f"{r['max_tokens']}-token" for r in runs]
    share = [100 * r["queue_fraction"] for r in runs]
    wall = [100 * r["wall_overhead"] for r in runs]
    xs = range(len(runs))
    right.bar([x - 0.2 for x in xs], share, width=0.4, label="queue / engine time", color="tab:green")
    right.bar([x + 0.2 for x in xs], wall, width=0.4, label="worker wall vs engine alone", color="tab:gray")
    right.axhline(100 * report["engine"]["target_fraction"], color="black", linestyle="--", label="target")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("% of engine time")
    right.set_title("tiny model through the local worker")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rates(timeline: list[dict], tenant: str) -> tuple[list[float], list[float]]:
    """A tenant's harvested tokens/s between consecutive samples, once its batch exists."""
    times, rates = [], []
    for a, b in pairwise(timeline):
        if tenant in b["tokens"]:
            times.append(b["t"])
            rates.append((b["tokens"][tenant] - a["tokens"].get(tenant, 0)) / (b["t"] - a["t"]))
    return times, rates


def plot_tenants(result: dict, path: Path) -> None:
    """The batch suite: each tenant's harvested tokens/s beside online traffic, then the fair
    tenants' cumulative shares over time."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7))
    mixed, tenants = result["beside_online"], result["tenants"]
    top.axvspan(0, mixed["trace_s"], color="tab:gray", alpha=0.12, label="online trace")
    for tenant, color in (("bulk", "tab:blue"), ("urgent", "tab:orange")):
        times, rates = _rates(mixed["timeline"][::2], tenant)  # 1 s steps: results land in bursts
        top.step(
            times, rates, where="pre", color=color, label=f"{tenant} ({tenants[tenant]['window']} window)"
        )
    urgent = tenants["urgent"]
    top.axvline(
        urgent["created_after_s"], color="tab:orange", linestyle="--", linewidth=1, label="urgent created"
    )
    if urgent["seconds"]:
        done = urgent["created_after_s"] + urgent["seconds"]
        top.axvline(done, color="tab:orange", linestyle=":", linewidth=1, label="urgent completed")
    top.set_xlabel("seconds since the trace started")
    top.set_ylabel("harvested tokens/s")
    top.set_title("two tenants' batches beside online traffic")
    fair = result["fairness"]
    bound = result["targets"]["fair_share_within_10pct"]["bound"]
    bottom.axhspan(0.5 * (1 - bound), 0.5 * (1 + bound), color="tab:green", alpha=0.15, label="target band")
    for tenant in fair["timeline"][0]["tokens"]:
        points = [(s["t"], s["tokens"][tenant] / sum(s["tokens"].values()))
                  for s in fair["timeline"] if sum(s["tokens"].values())]  # fmt: skip
        if points:
            bottom.plot(*zip(*points), marker=".", label=tenant)
    bottom.axvspan(fair["judged_from_s"], fair["judged_at_s"], color="black", alpha=0.08, label="judged")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("seconds since both batches were created")
    bottom.set_ylabel("share of harvested tokens")
    bottom.set_title("two tenants, equal batches: cumulative shares")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
