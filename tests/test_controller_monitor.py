"""The controller's monitor thread outlives Redis going away (without Ray: the thread and
its Redis calls are the point here, not the actor around them)."""

from __future__ import annotations

from controller.controller import HarvestController
from tests.test_queue_store import wait_for


def test_monitor_survives_redis_stopping_and_resumes(redis_server, make_job):
    job_id = make_job(2)
    controller = HarvestController(
        {"redis_url": redis_server.url, "monitor_period_s": 0.05, "num_workers": 1}
    )
    try:
        assert controller.status()["jobs"][0]["id"] == job_id
        redis_server.stop()
        cause = wait_for(lambda: controller.redis_error)
        assert "ConnectionError" in cause and controller._monitor.is_alive()
        snapshot = controller.status()  # still answers: the workers' view, no jobs, the cause
        assert snapshot["jobs"] == [] and snapshot["redis_error"] == cause
        redis_server.start()
        wait_for(lambda: controller.redis_error is None)  # cleared by a round that listed the jobs
        assert controller._monitor.is_alive()
        assert controller.status()["jobs"][0]["id"] == job_id
    finally:
        controller.shutdown()
