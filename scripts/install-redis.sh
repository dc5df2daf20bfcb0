#!/usr/bin/env bash
# Finds or installs redis-server (needed by the job queue and its tests).
set -euo pipefail
command -v redis-server >/dev/null && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if command -v apt-get >/dev/null; then $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server
elif command -v brew >/dev/null; then brew install redis
elif command -v dnf >/dev/null; then $SUDO dnf install -y redis
else echo "install redis-server (https://redis.io/docs/latest/operate/oss_and_stack/install/) and retry" >&2; exit 1
fi
