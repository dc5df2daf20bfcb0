"""Is this Redis fit to hold the job queue? Checked at connect, once per process and server.

Fatal (RedisConfigError, nothing starts):
- a server older than 6.2: the queue's Lua uses LMOVE and ZRANGE ... BYSCORE, so jobs would be
  accepted and never leased;
- an eviction policy other than `noeviction` under a memory limit: at the limit Redis would
  drop queued shards, leases and results, and jobs would vanish without an error record.

A warning (logged, the queue runs):
- AOF off: a Redis restart loses what was written since its last snapshot. Managed Redis
  (ElastiCache, Memorystore) often offers no AOF and gets durability from replicas instead,
  so this is not fatal; `HARVEST_REDIS_ALLOW_NO_AOF=1` says the operator knows and silences it;
- an evicting policy with no memory limit (nothing is evicted until someone sets one);
- a server that lets us read neither INFO nor CONFIG (an ACL user without @dangerous).

The facts come from INFO (`redis_version`, `aof_enabled`, `maxmemory_policy`, `maxmemory`):
the running state, and what managed Redis allow where they forbid CONFIG. Where an ACL
forbids INFO, CONFIG GET and HELLO stand in.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import redis

from harvest.queue.errors import QueueError
from harvest.redact import redact_url

MIN_VERSION = (6, 2)
ALLOW_NO_AOF_ENV = "HARVEST_REDIS_ALLOW_NO_AOF"

log = logging.getLogger("harvest.queue")
_passed: set[str] = set()  # URLs already checked in this process: warn once, INFO once


class RedisConfigError(QueueError, RuntimeError):
    """The Redis at `url` would lose or never run jobs; the message says what to change."""

    def __init__(self, url: str, problems: list[str]) -> None:
        self.url = redact_url(url)
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the Redis at {self.url} cannot hold harvest's job queue:\n{listed}")


@dataclass(frozen=True)
class ServerFacts:
    """What the checks need to know of a server; None where it could not be read."""

    version: str | None
    aof_enabled: bool | None
    maxmemory_policy: str | None
    maxmemory: int | None


def parse_version(version: str) -> tuple[int, ...]:
    """`7.0.15` -> (7, 0, 15); a suffix such as `-rc1` is ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0])[:3])


def facts_from_info(info: dict[str, Any]) -> ServerFacts:
    aof = info.get("aof_enabled")
    maxmemory = info.get("maxmemory")
    return ServerFacts(
        version=None if info.get("redis_version") is None else str(info["redis_version"]),
        aof_enabled=None if aof is None else int(aof) == 1,
        maxmemory_policy=info.get("maxmemory_policy"),
        maxmemory=None if maxmemory is None else int(maxmemory),
    )


def _hello_version(client: redis.Redis) -> str | None:
    try:
        reply = client.execute_command("HELLO")
    except redis.ResponseError:
        return None
    if isinstance(reply, list):  # RESP2: a flat key, value list
        reply = dict(zip(reply[::2], reply[1::2], strict=False))
    version = {_text(k): v for k, v in reply.items()}.get("version")
    return None if version is None else _text(version)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_facts(client: redis.Redis) -> ServerFacts:
    """INFO where allowed, else CONFIG GET and HELLO, else unknowns."""
    try:
        return facts_from_info(client.info())
    except redis.ResponseError:  # NoPermissionError, or a proxy that has no INFO
        pass
    config: dict[str, Any] = {}
    try:
        config = {_text(k): _text(v) for k, v in client.config_get("maxmemory*").items()}
        config |= {_text(k): _text(v) for k, v in client.config_get("appendonly").items()}
    except redis.ResponseError:
        pass
    return ServerFacts(
        version=_hello_version(client),
        aof_enabled=None if "appendonly" not in config else config["appendonly"] == "yes",
        maxmemory_policy=config.get("maxmemory-policy"),
        maxmemory=int(config["maxmemory"]) if "maxmemory" in config else None,
    )


def problems(facts: ServerFacts) -> tuple[list[str], list[str]]:
    """(fatal, warnings), each a sentence naming the setting and how to change it."""
    fatal: list[str] = []
    warnings: list[str] = []
    need = ".".join(map(str, MIN_VERSION))
    if facts.version is None:
        warnings.append(f"could not read the server version (INFO and HELLO denied); harvest needs >= {need}")
    elif parse_version(facts.version) < MIN_VERSION:
        fatal.append(
            f"version {facts.version} < {need}: the queue's scripts use LMOVE and ZRANGE ... BYSCORE; "
            "install Redis >= 6.2 (scripts/install-redis.sh, or your provider's engine version)"
        )
    policy = facts.maxmemory_policy
    if policy is not None and policy != "noeviction":
        fix = (
            "`CONFIG SET maxmemory-policy noeviction` and `maxmemory-policy noeviction` in redis.conf "
            "(a managed Redis: its parameter group)"
        )
        if facts.maxmemory:
            fatal.append(
                f"maxmemory-policy is {policy} with maxmemory {facts.maxmemory}: at the limit Redis "
                f"evicts queued jobs and results; {fix}"
            )
        else:
            warnings.append(f"maxmemory-policy is {policy}: with a maxmemory set, Redis evicts jobs; {fix}")
    if facts.maxmemory_policy is None and facts.aof_enabled is None:
        warnings.append(
            "could not read the eviction policy or persistence (INFO and CONFIG denied): make sure "
            "maxmemory-policy is noeviction and appendonly is yes"
        )
    if facts.aof_enabled is False and os.environ.get(ALLOW_NO_AOF_ENV) != "1":
        warnings.append(
            "AOF is off (appendonly no): a Redis restart loses jobs written since its last snapshot; "
            "`CONFIG SET appendonly yes` and `appendonly yes` in redis.conf, or set "
            f"{ALLOW_NO_AOF_ENV}=1 where replicas give durability"
        )
    return fatal, warnings


def check_server(client: redis.Redis, url: str) -> None:
    """Raise RedisConfigError if the server would lose or never run jobs; log the lesser risks."""
    if url in _passed:
        return
    fatal, warnings = problems(read_facts(client))
    if fatal:
        raise RedisConfigError(url, fatal)
    for warning in warnings:
        log.warning("Redis at %s: %s", redact_url(url), warning)
    _passed.add(url)
