"""Delivery-aware SLO feedback (pure logic; the service test covers the wiring in the worker)."""

from __future__ import annotations

from harvest.serving.feedback import SLOFeedback


def test_shrinks_on_misses_and_waits_for_fresh_samples():
    fb = SLOFeedback(min_samples=5)
    fb.observe([0.1] * 4, [0.05] * 4)
    assert fb.update(1.0, 0.02) is None  # too few samples to judge
    fb.observe([0.1], [0.05])
    assert fb.update(1.0, 0.02) == 0.8  # TPOT p90 2.5x the SLO
    assert fb.update(1.0, 0.02) is None  # the evidence was used up: no second cut on it
    for _ in range(20):
        fb.observe([0.1] * 5, [0.05] * 5)
        fb.update(1.0, 0.02)
    assert fb.scale == fb.floor


def test_grows_back_with_room_but_never_past_the_slo():
    fb = SLOFeedback(min_samples=5, scale=0.5)
    fb.observe([0.5] * 5, [0.01] * 5)  # TTFT p90 at half the SLO, TPOT at half
    assert fb.update(1.0, 0.02) == 0.5 * 1.05
    fb.observe([0.7] * 5, [0.01] * 5)  # under the aim but without slack: hold
    assert fb.update(1.0, 0.02) is None
    for _ in range(40):
        fb.observe([0.1] * 5, [0.001] * 5)
        fb.update(1.0, 0.02)
    assert fb.scale == 1.0


def test_ttft_misses_count_too():
    fb = SLOFeedback(min_samples=5)
    fb.observe([2.0] * 5, [])  # one-token requests: no TPOT samples
    assert fb.update(1.0, 0.02) == 0.8
