"""Delivery-aware SLO targets: what a worker's engine plans for, from what its clients see.

The engine sizes offline work so that its own steps meet the SLO, but every token still
travels from the engine thread through the replica's HTTP stack and the load balancer to
the client, and on a busy node that way costs time the engine never sees (on the 2-core
CPU box, a few ms per token next to an offline backlog). The worker observes the TTFT and
TPOT of its finished online requests; when their recent p90 passes 0.8x the SLO (aiming
the p90 below the SLO keeps the P99 near it), the share of the SLO the engine may plan for
shrinks (x0.8); under 0.6x it grows back (x1.05) up to the SLO itself. Each decision waits
for fresh samples, so one slow burst is not punished twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def p90(values: deque[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass
class SLOFeedback:
    min_samples: int = 5  # finished online requests per decision
    floor: float = 0.25  # never plan for less than this share of the SLO
    shrink: float = 0.8
    grow: float = 1.05
    aim: float = 0.8  # hold the observed p90 under this share of the SLO, so the tail stays inside it
    slack: float = 0.6  # grow only while the observed p90 is under this share of the SLO
    scale: float = 1.0  # the share of the SLO the engine plans for
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    tpot: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def observe(self, ttft_s: list[float], tpot_s: list[float]) -> None:
        self.ttft.extend(ttft_s)
        self.tpot.extend(tpot_s)

    def update(self, slo_ttft_s: float, slo_tpot_s: float) -> float | None:
        """The new scale when enough fresh samples call for a change, else None."""
        if len(self.ttft) < self.min_samples:
            return None
        worst = p90(self.ttft) / slo_ttft_s
        if len(self.tpot) >= self.min_samples:
            worst = max(worst, p90(self.tpot) / slo_tpot_s)
        self.ttft.clear()
        self.tpot.clear()
        if worst > self.aim:
            new = max(self.floor, self.scale * self.shrink)
        elif worst < self.slack:
            new = min(1.0, self.scale * self.grow)
        else:
            return None
        if new == self.scale:
            return None
        self.scale = new
        return new
