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
        }
    )
    try:
        periods = [
            controller.heartbeat(f"sim-{i:04d}", worker_stats(i), None)["period_s"] for i in range(1000)
        ]
        assert periods[0] == 0.25  # a small fleet: the monitor period
        # the default budget, 110 heartbeats a second: 27 workers at 0.25 s, 1,000 at 9.1 s
        assert periods[26] == 0.25 and periods[99] == 100 / 110 and periods[-1] == 1000 / 110
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


def test_a_worker_sends_its_handle_until_the_controller_holds_it(redis_server):
    """The handle rides along only when asked: once, and again after a controller restart
    (whose view starts empty). A worker in the view without its handle yet is not pinged."""
    config = {"redis_url": redis_server.url, "num_workers": 1, "monitor_period_s": 0.25}
    controller = HarvestController(config)
    handle = object()  # what the controller keeps to ping a silent worker; any value here
    try:
        assert controller.heartbeat("w0", worker_stats(0), None)["send_handle"]
        controller.view["w0"]["seen"] = 0.0  # silent, but no handle to ask with: left alone
        controller._check_silent()
        assert "w0" in controller.view
        assert not controller.heartbeat("w0", worker_stats(0), handle)["send_handle"]
        assert not controller.heartbeat("w0", worker_stats(0), None)["send_handle"]
        assert controller.actors["w0"] is handle  # kept across reports without it
    finally:
        controller.shutdown()
    restarted = HarvestController(config)
    try:
        assert restarted.heartbeat("w0", worker_stats(0), None)["send_handle"]
    finally:
        restarted.shutdown()
