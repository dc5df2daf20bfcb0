"""The service config the controller keeps in Redis, so that a restarted controller gets it
back (with later changes such as a new SLO). The secrets are never written there: a
restarted controller has them from its own creation arguments."""

from __future__ import annotations

import json
from typing import Any

import redis

CONFIG_KEY = "harvest:service"
SECRET_SETTINGS = ("api_key", "redis_url")


def public_settings(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without its secrets."""
    return {k: v for k, v in config.items() if k not in SECRET_SETTINGS}


class ConfigStore:
    """get / put / clear of the one stored service config."""

    def __init__(self, client: redis.Redis, key: str = CONFIG_KEY) -> None:
        self.client = client
        self.key = key

    def get(self) -> dict[str, Any]:
        """The stored config ({} when none is), secrets dropped should an old one hold any."""
        stored = self.client.get(self.key)
        return public_settings(json.loads(stored)) if stored else {}

    def put(self, config: dict[str, Any]) -> None:
        self.client.set(self.key, json.dumps(public_settings(config)))

    def clear(self) -> None:
        self.client.delete(self.key)
