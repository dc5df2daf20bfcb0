"""The service's user-facing configuration: one schema for `harvest up` flags, the YAML file
(`--config harvest.yaml`) and the `args` of the Serve application builder (harvest.deploy:app).

Pydantic at this edge only: it turns a file, a flag or a Serve `args` dict into a checked
`HarvestConfig`, with errors that name the key (and the file). `service_config` hands the
layers below their own plain dataclasses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harvest.engine.config import Policy, SLOConfig
from harvest.queue.config import WorkerConfig

_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNIT = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
DEFAULT_MODEL_NAME = "harvest"  # served name for a local directory or the demo model


class ConfigError(ValueError):
    """A bad key in a config file, flag or Serve `args`; the message names the key (and file)."""


def parse_kv_cache_memory(value: str | int | float) -> int | float:
    """`2GiB`, `512MB` or a byte count -> bytes (int); a number in (0, 1] -> that fraction of
    free device memory (float, CUDA only)."""
    if isinstance(value, bool):
        raise ValueError("must be bytes (like 2GiB) or a fraction in (0, 1]")
    is_fraction = isinstance(value, str) and re.fullmatch(r"\s*(0?\.\d+|1\.0*)\s*", value)
    if isinstance(value, float) or is_fraction:
        fraction = float(value)
        if not 0 < fraction <= 1:
            raise ValueError(f"a fraction of device memory must be in (0, 1], got {value}")
        return fraction
    if isinstance(value, int):
        number, unit = value, "b"
    else:
        m = _BYTES.match(value)
        if m is None:
            raise ValueError(f"must be bytes like 2GiB or 1073741824, or a fraction like 0.8; got {value!r}")
        number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    size = int(number * _UNIT[unit])
    if size < 1:
        raise ValueError(f"must be at least 1 byte, got {value!r}")
    return size


class QueueConfig(BaseModel):
    """How each worker takes offline work (the `queue:` mapping): the fields of
    harvest/queue/config.py's WorkerConfig, whose defaults hold for the keys not given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    visibility_timeout_s: float | None = Field(None, gt=0)  # a lease not renewed this long goes back
    renew_interval_s: float | None = Field(None, gt=0)
    progress_interval_s: float | None = Field(None, gt=0)  # bound on decode work a crash loses
    result_flush_s: float | None = Field(None, ge=0)
    max_inflight_requests: int | None = Field(None, ge=1)
    max_shards: int | None = Field(None, ge=1)  # shards one worker holds at a time
    idle_poll_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> QueueConfig:
        WorkerConfig(**self.options())  # the checks across keys (renewal within the timeout)
        return self

    def options(self) -> dict[str, Any]:
        """The keys given, as WorkerConfig's keyword arguments."""
        return self.model_dump(exclude_none=True)


class HarvestConfig(BaseModel):
    """Every option of `harvest up`; keys are the flags' names with `_` for `-`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None  # a local directory or ORG/NAME[@REVISION]; None: the tiny demo model
    served_model_name: list[str] = Field(default_factory=list)  # empty: the Hub id, or "harvest"
    workers: int | None = Field(None, ge=1)  # None: one per GPU (or one CPU worker)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    kv_cache_memory: int | float | None = None  # bytes or a fraction; None: the engine's default
    max_model_len: int | None = Field(None, ge=1)
    policy: Policy = Policy.HARVEST
    slo_ttft_ms: float | None = Field(None, gt=0)
    slo_tpot_ms: float | None = Field(None, gt=0)
    # keys clients may use, each one tenant (see harvest/api/auth.py): `KEY` or `NAME:KEY`
    api_key: str | list[str] | None = Field(None, repr=False)
    api_key_file: Path | None = None  # a file of such keys, one a line (a mounted secret)
    redis_url: str | None = Field(None, repr=False)  # None: $HARVEST_REDIS_URL, else the embedded Redis
    address: str | None = None  # Ray cluster address; None: a local Ray head
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    job_ttl: str | None = None  # e.g. 7d, 12h, 3600; None: 7 days
    termination_notice: Path | None = None  # a worker drains when this file appears on its node
    queue: QueueConfig = Field(default_factory=QueueConfig)

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _kv(cls, value: Any) -> Any:
        return None if value is None else parse_kv_cache_memory(value)

    @field_validator("job_ttl", mode="before")
    @classmethod
    def _ttl(cls, value: Any) -> Any:
        from harvest.client import parse_window

        if value is None:
            return None
        try:
            seconds = parse_window(value if isinstance(value, int | float) else str(value))
        except ValueError:
            seconds = None
        if seconds is None or seconds <= 0:
            raise ValueError(f"must be a positive time like 7d, 12h or 3600, got {value!r}")
        return str(value)

    @property
    def job_ttl_s(self) -> float | None:
        from harvest.client import parse_window

        return parse_window(self.job_ttl)

    def model_names(self) -> list[str]:
        """What clients may pass as `model`: the names given, else the Hub id, else "harvest"."""
        if self.served_model_name:
            return list(self.served_model_name)
        from harvest.models.resolve import ModelUnavailable, parse_model

        try:
            hub_id = parse_model(self.model).served_name if self.model else None
        except ModelUnavailable:  # `resolve_model` says why, where the model is needed
            hub_id = None
        return [hub_id or DEFAULT_MODEL_NAME]

    @field_validator("api_key")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        from harvest.tenants import parse_keys

        if value == []:
            return None
        if value is not None:  # ValueError names the entry by its position, never its text
            parse_keys([value] if isinstance(value, str) else value)
        return value

    def resolved_api_key(self) -> str | dict[str, str] | None:
        """The keys of `api_key_file`, else of `api_key`: one unnamed key as itself (its tenant is
        named by its hash), else {key: tenant name}; None for none. ConfigError names the file."""
        from harvest.tenants import parse_keys, tenant_name

        if self.api_key_file is None:
            keys = parse_keys([self.api_key] if isinstance(self.api_key, str) else self.api_key or [])
        else:  # the file wins over `api_key`, as it always has
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"api_key_file: cannot read {self.api_key_file}: {exc.strerror}") from None
            try:
                keys = parse_keys(lines, f"api_key_file: {self.api_key_file} line")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if not keys:
                raise ConfigError(f"api_key_file: {self.api_key_file} is empty")
        if len(keys) == 1:
            ((key, name),) = keys.items()
            if name == tenant_name(key):  # given without a name
                return key
        return keys or None

    def engine_options(self) -> dict[str, Any]:
        """The engine's keyword options (Engine.from_pretrained) for what is set here."""
        options: dict[str, Any] = {"dtype": self.dtype, "policy": self.policy.value}
        if isinstance(self.kv_cache_memory, float):
            options["kv_cache_fraction"] = self.kv_cache_memory
        elif self.kv_cache_memory is not None:
            options["kv_cache_bytes"] = self.kv_cache_memory
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        if self.slo_ttft_ms is not None or self.slo_tpot_ms is not None:
            default = SLOConfig()  # the controller reads both targets
            options["slo"] = {
                "ttft_s": self.slo_ttft_ms / 1e3 if self.slo_ttft_ms else default.ttft_s,
                "tpot_s": self.slo_tpot_ms / 1e3 if self.slo_tpot_ms else default.tpot_s,
            }
        return options

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data for people: keys masked, Redis passwords masked."""
        from harvest.redact import MASK, redact_url

        data = self.model_dump(mode="json")
        if isinstance(data["api_key"], list):
            data["api_key"] = [MASK] * len(data["api_key"])
        elif data["api_key"] is not None:
            data["api_key"] = MASK
        if data["redis_url"] is not None:
            data["redis_url"] = redact_url(data["redis_url"])
        return data


def _describe(
    error: ValidationError, source: str | None, flags: set[str] | frozenset[str] = frozenset()
) -> str:
    """One line per bad key: `key in FILE: why`, or `--key: why` for a key given as a flag."""
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["loc"] and e["loc"][0] in flags:
            lines.append(f"--{str(e['loc'][0]).replace('_', '-')}: {message}")
        else:
            lines.append(f"{key}{f' in {source}' if source else ''}: {message}")
    return "; ".join(lines)


def build_config(values: dict[str, Any], source: str | None = None) -> HarvestConfig:
    """A checked config from plain data (a file's mapping, Serve `args`); ConfigError names the key."""
    try:
        return HarvestConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML file's mapping (not yet checked: flags go on top before `build_config`)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping (model: ..., port: ...), not {type(data).__name__}")
    return data


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> HarvestConfig:
    """The file's keys, then the flags given (`overrides`, None values left out) on top."""
    values = read_config_file(path) if path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value not in (None, [], ())}
    try:
        return HarvestConfig.model_validate({**values, **given})
    except ValidationError as exc:  # a flag's bad value is the flag's fault, not the file's
        raise ConfigError(_describe(exc, str(path) if path else None, set(given))) from None


def redis_url_of(config: HarvestConfig) -> str | None:
    return config.redis_url or os.environ.get("HARVEST_REDIS_URL")
