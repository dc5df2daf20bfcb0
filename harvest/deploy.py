"""`harvest.deploy:app`: the Serve application builder for `serve run`, `serve deploy` and a
KubeRay RayService (`import_path: harvest.deploy:app`, `args:` the keys of harvest/config.py).

Serve calls `app(args)` where Ray is already up (the driver of `serve run`, or Serve's own
controller for `serve deploy`). It checks the args like `harvest up` checks its flags,
finds the model (a Hub id is fetched into this node's cache here, and by each worker into
its own node's), starts harvest's
controller, as `harvest up` does first, and returns the bound workers' application.
Serve's own `http_options` decide where HTTP listens: `host` and `port` are ignored here.
"""

from __future__ import annotations

from typing import Any

from harvest.config import ConfigError, build_config, redis_url_of


def app(args: dict[str, Any]) -> Any:
    """The workers' Serve application for `args` (a mapping of harvest/config.py keys)."""
    from harvest import service
    from harvest.models.resolve import ModelUnavailable, resolve_model

    config = build_config(dict(args), source="the Serve application's args")
    redis_url = redis_url_of(config)
    if redis_url is None:  # no embedded Redis here: the queue must outlive any one node
        raise ConfigError("redis_url: required in the args (or HARVEST_REDIS_URL) for a Serve deployment")
    if config.model is None:
        raise ConfigError(
            "model: required in the args (a Hub id ORG/NAME[@REVISION] or a path on every node)"
        )
    try:
        resolve_model(config.model)
    except ModelUnavailable as exc:
        raise ConfigError(f"model: {exc}") from None
    return service.application(service.service_config(config, config.model, redis_url))
