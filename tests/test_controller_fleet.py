"""The controller paces a large fleet's heartbeats and its view holds every worker (without
Ray: the pacing is the controller's own arithmetic; `harvest bench scale` measures it under
real Ray calls)."""

from __future__ import annotations

import time

from controller.controller import HarvestController
from workloads.bench.controller_load import worker_stats


def test_a_large_fleet_reports_less_often_and_stays_in_view(redis_server):
    controller = HarvestController(
        {
            "redis_url": redis_server.url,
            "num_workers": 1000,
            "monitor_period_s": 0.25,
            "max_heartbeats_per_s": 400,
        }
    )
    try:
        periods = [
            controller.heartbeat(f"sim-{i:04d}", worker_stats(i), None)["period_s"] for i in range(1000)
        ]
        assert periods[0] == 0.25  # a small fleet: the monitor period
        assert periods[99] == 0.25 and periods[-1] == 2.5  # 1,000 workers x 1/2.5 s = 400 a second
        assert controller.ready()
        status = controller.status()
        assert len(status["workers"]) == 1000
        assert time.time() - min(w["seen"] for w in status["workers"].values()) < 30
        assert status["workers"]["sim-0007"]["totals"]["latency"]["ttft_s"]["online"]["counts"]
        # a worker silent for 4 of its periods is checked; with the fleet's longer period none is yet
        controller._check_silent()
        assert len(controller.status()["workers"]) == 1000
    finally:
        controller.shutdown()
