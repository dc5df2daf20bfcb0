#!/usr/bin/env bash
# The head node of a `ray up` cluster (head_setup_commands; idempotent, `ray up` runs it on
# every update): Redis >= 6.2 for the job queue, with a password and bound to the private
# address only; harvest's secrets; /etc/harvest.yaml; the unit that brings Ray and harvest
# back after a reboot.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ETC=/etc/harvest

bash "$HERE/../install-redis.sh"

# the address the workers reach the head on (the source of the default route), not every interface
PRIVATE_IP=$(ip -4 route get 1.1.1.1 | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}')
[ -n "$PRIVATE_IP" ] || { echo "head-setup: no private IPv4 address found" >&2; exit 1; }

# secrets: made here, once, readable by this user only; never in cluster.yaml or a command line
sudo install -d -m 0700 -o "$(id -un)" -g "$(id -gn)" "$ETC"
umask 077
[ -s "$ETC/redis-password" ] || openssl rand -hex 32 > "$ETC/redis-password"
[ -s "$ETC/api-key" ] || openssl rand -hex 32 > "$ETC/api-key"
PASSWORD=$(cat "$ETC/redis-password")
echo "HARVEST_REDIS_URL=redis://:$PASSWORD@$PRIVATE_IP:6379/0" > "$ETC/env"

# Redis: harvest's settings in one included file (readable by redis only); the last value wins,
# so they override the packaged redis.conf, which stays as shipped
sudo tee /etc/redis/harvest.conf >/dev/null <<CONF
bind 127.0.0.1 $PRIVATE_IP
protected-mode yes
port 6379
requirepass $PASSWORD
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
CONF
sudo chown redis:redis /etc/redis/harvest.conf
sudo chmod 0600 /etc/redis/harvest.conf
grep -qx 'include /etc/redis/harvest.conf' /etc/redis/redis.conf \
  || echo 'include /etc/redis/harvest.conf' | sudo tee -a /etc/redis/redis.conf >/dev/null
sudo systemctl enable --quiet redis-server
sudo systemctl restart redis-server

# harvest's config (edit scripts/cluster/harvest.yaml and `ray up` again) and the boot unit
sudo install -m 0644 "$HERE/harvest.yaml" /etc/harvest.yaml
sudo install -m 0755 "$HERE/head-start.sh" /usr/local/bin/harvest-head-start
sudo install -m 0644 "$HERE/serve-env.sh" /etc/harvest-serve-env.sh
sed "s/^User=.*/User=$(id -un)/" "$HERE/harvest-head.service" | sudo tee /etc/systemd/system/harvest-head.service >/dev/null
sudo systemctl daemon-reload
sudo systemctl enable --quiet harvest-head.service

# `harvest submit/status/jobs` in a shell on the head find the queue
grep -q "$ETC/env" ~/.bashrc || echo "set -a; . $ETC/env; set +a" >> ~/.bashrc
echo "head-setup: Redis $(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p') on 127.0.0.1 and $PRIVATE_IP:6379 (password in $ETC/redis-password)"
