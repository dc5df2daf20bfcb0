# Sourced before `ray start` on every node of a `ray up` cluster: harvest's Serve path (HAProxy
# front end, direct ingress), the same variables as SERVE_ENV in harvest/serve_env.py, which
# Ray reads only when it starts (tests/test_cluster_yaml.py keeps the two equal). GPU nodes
# take the cuda DeviceProfile, which leaves Ray's worker niceness alone.
export RAY_SERVE_ENABLE_HA_PROXY=1
export RAY_SERVE_ENABLE_DIRECT_INGRESS=1
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0
export RAY_SERVE_THROUGHPUT_OPTIMIZED=1
export RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response 503"
