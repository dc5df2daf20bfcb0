#!/usr/bin/env bash
# Ray's head, then harvest on it: run by `ray up` (head_start_ray_commands) and, after a reboot
# of the head, by harvest-head.service, so that the endpoint comes back either way.
set -euo pipefail
VENV=$HOME/venv/bin
set -a; . /etc/harvest/env; set +a
. /etc/harvest-serve-env.sh
ulimit -n 65536

"$VENV/ray" stop >/dev/null 2>&1 || true
# GCS on 6380 (6379 is the job queue's Redis); the dashboard, which can run any job, on
# localhost only: reach it with `ray dashboard cluster.yaml`
"$VENV/ray" start --head --port=6380 --object-manager-port=8076 --dashboard-host=127.0.0.1 \
  --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --disable-usage-stats

# the workers' engines go where the GPUs are: wait (up to 30 min) for the autoscaler's first
# GPU node, or `harvest up` would see none and start its workers on CPU
deadline=$((SECONDS + 1800))
until "$VENV/python" - <<'PY' 2>/dev/null
import sys, ray
ray.init(address="auto", logging_level="error", log_to_driver=False)
sys.exit(0 if ray.cluster_resources().get("GPU", 0) >= 1 else 1)
PY
do
  [ "$SECONDS" -lt "$deadline" ] || { echo "no GPU node joined within 30 min: see \`ray status\`" >&2; exit 1; }
  sleep 15
done

exec "$VENV/harvest" up --address auto --config /etc/harvest.yaml
