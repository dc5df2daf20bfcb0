#!/usr/bin/env bash
# The image's entrypoint. `harvest up` starts Redis, Ray and the service in the background and
# returns; a container lives as long as its first process, so for `harvest up` this one stays,
# and on `docker stop` (SIGTERM) runs `harvest down` so leased shards go back to the queue and
# Redis flushes its append-only file. Any other command (`harvest submit ...`, bash) runs as is.
set -euo pipefail
if [ "${1:-}" != "harvest" ] || [ "${2:-}" != "up" ]; then
  exec "$@"
fi
"$@"
stopping() {
  harvest down || true
  exit 0
}
trap stopping TERM INT
sleep infinity &
wait $!
