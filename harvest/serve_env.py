"""The environment Ray and Serve run harvest with (`SERVE_ENV`), set before Ray starts.

Its own module because both the local Ray launcher (harvest/local_ray.py) and the entry
points that start the service need it, and neither should import the other for it.
Measured effects of these settings: docs/BENCHMARKS.md (e2e and peers suites).
"""

from __future__ import annotations

import os

# Serve's HAProxy front end with direct ingress: HTTP goes HAProxy -> a worker replica's
# own server, skipping Serve's Python proxy and its RPC hop to the replica.
# HAProxy balances by least connections: an online request is one open connection, so the
# worker with the fewest online requests in flight gets the next one.
# RAY_SERVE_THROUGHPUT_OPTIMIZED is Ray's own low-overhead Serve profile; what it changes
# here: the OpenAI app runs on the replica's main event loop, not a second loop in
# another thread, so each request and each streamed token skips a hop between threads.
# Ray reads these when it starts; a value already in the environment wins.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # no load balancer to deregister from
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A request whose worker dies before answering (the connection closes with no response)
    # or answers 503 (its engine loop is gone) is retried on another worker: the client sees
    # no error. A request that already streamed tokens cannot be retried, and is not.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response 503",
}


def use_serve_env(private_ports: bool = False, device: str = "cpu") -> None:
    """Put SERVE_ENV and the Ray settings of `device`'s profile (the workers' niceness) into
    this process's environment, for a Ray started from here.

    `private_ports` (tests, benchmarks): HAProxy's metrics and stats listeners on free ports
    instead of Serve's fixed 9101 and 8404, so that a second service on the machine (a
    `harvest up`, another test run) does not stop this one's HAProxy from starting."""
    from harvest.serving.device_profile import DeviceProfile

    for key, value in {**SERVE_ENV, **DeviceProfile.for_device(device).ray_env()}.items():
        os.environ.setdefault(key, value)
    if private_ports:
        from harvest.local_redis import free_port

        for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
            os.environ.setdefault(key, str(free_port()))
