#!/usr/bin/env bash
# Finds or installs a redis-server that runs harvest's job queue: version >= 6.2 (the queue's
# Lua uses LMOVE and ZRANGE ... BYSCORE). Ubuntu 22.04 and Debian 11 ship 6.0, so on apt
# systems whose own package is too old this adds the official packages.redis.io repository.
# Ends by printing the installed version, or says what to do and exits 1.
#   scripts/install-redis.sh            # as a user with sudo, or as root
set -euo pipefail

MIN_MAJOR=6 MIN_MINOR=2
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

version_of() {  # "Redis server v=7.0.15 sha=..." -> 7.0.15
  "$1" --version 2>/dev/null | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p'
}

new_enough() {  # new_enough 6.2.14 -> true
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [ -n "$major" ] && { [ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "${minor:-0}" -ge "$MIN_MINOR" ]; }; }
}

installed_ok() {
  local binary version
  binary=$(command -v redis-server) || return 1
  version=$(version_of "$binary")
  new_enough "$version" && echo "redis-server $version at $binary: fine for harvest (>= $MIN_MAJOR.$MIN_MINOR)"
}

from_source_hint() {
  cat >&2 <<EOF
Install Redis >= $MIN_MAJOR.$MIN_MINOR yourself, one of:
  - the official packages: https://redis.io/docs/latest/operate/oss_and_stack/install/install-redis/
  - from source:  curl -fsSL https://download.redis.io/redis-stable.tar.gz | tar xz
                  cd redis-stable && make BUILD_TLS=yes && sudo make install
  - or point harvest at a managed Redis >= $MIN_MAJOR.$MIN_MINOR: export HARVEST_REDIS_URL=rediss://user:password@host:6379/0
then run this script again to check.
EOF
}

apt_candidate() {  # the version apt would install for redis-server, e.g. 5:6.0.16-1ubuntu1 -> 6.0.16
  apt-cache policy redis-server 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9]*:\)\{0,1\}\([0-9][0-9.]*\).*/\2/p'
}

add_redis_apt_repo() {
  $SUDO apt-get install -y -qq curl gpg lsb-release ca-certificates >/dev/null
  curl -fsSL https://packages.redis.io/gpg | $SUDO gpg --dearmor --yes -o /usr/share/keyrings/redis-archive-keyring.gpg
  $SUDO chmod 644 /usr/share/keyrings/redis-archive-keyring.gpg
  echo "deb [signed-by=/usr/share/keyrings/redis-archive-keyring.gpg] https://packages.redis.io/deb $(lsb_release -cs) main" \
    | $SUDO tee /etc/apt/sources.list.d/redis.list >/dev/null
  $SUDO apt-get update -qq
}

installed_ok && exit 0
if command -v redis-server >/dev/null; then
  echo "redis-server $(version_of "$(command -v redis-server)") is too old for harvest (needs >= $MIN_MAJOR.$MIN_MINOR); upgrading" >&2
fi

if command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  if ! new_enough "$(apt_candidate)"; then
    echo "this distribution's redis-server is $(apt_candidate): adding packages.redis.io" >&2
    add_redis_apt_repo
  fi
  $SUDO apt-get install -y -qq redis-server
elif command -v brew >/dev/null; then
  brew install redis
elif command -v dnf >/dev/null; then
  $SUDO dnf install -y redis
else
  from_source_hint; exit 1
fi

hash -r
installed_ok && exit 0
echo "the installed redis-server is $(version_of "$(command -v redis-server || echo redis-server)" || true), still < $MIN_MAJOR.$MIN_MINOR" >&2
from_source_hint
exit 1
