"""Offline request inputs: parse and validate one request at a time, never a whole file.

Every reader yields `(line, RequestSpec | InputError)` so that validation can report the
line number and reason of each bad line and the submitter can stream valid ones into
shards. Accepted: Python lists (prompt strings, chat-message lists, batch dicts), OpenAI
Batch JSONL, and tables (Parquet, CSV, JSONL) with a prompt column and template.

Each request body goes through the translator the HTTP routes use
(`harvest.protocol.requests.parse_body`), so a body is refused offline exactly when it
is refused online, with the same message naming the same field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvest.protocol.errors import InvalidRequest
from harvest.protocol.requests import (
    CHAT,
    COMPLETIONS,
    URLS,
    PromptSpec,
    check_sampling,
    check_text,
    parse_body,
)
from harvest.protocol.sampling_params import SamplingParams

__all__ = ["CHAT", "COMPLETIONS", "URLS"]  # re-exported: the queue's modules name urls from here


@dataclass(frozen=True)
class InputError:
    """One rejected line: where (1-based) and why."""

    line: int  # 0: the input as a whole (a missing column, a bad template)
    reason: str
    custom_id: str | None = None
    unit: str = "line"  # "line" of a file, "row" of a table, "item" of a Python list

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}" if self.line > 0 else self.reason

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "unit": self.unit, "message": self.reason, "custom_id": self.custom_id}


class BadRequest(ValueError):
    """Raised while parsing one request; becomes an InputError with its line number."""


@dataclass
class RequestSpec:
    """One validated request, as stored in a shard."""

    custom_id: str
    url: str
    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields, defaults merged in
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None

    def to_payload(self) -> dict[str, Any]:
        d: dict[str, Any] = {"custom_id": self.custom_id, "url": self.url, "params": self.params}
        if self.messages is not None:
            d["messages"] = self.messages
        else:
            d["prompt"] = self.prompt
        return d

    @classmethod
    def from_payload(cls, d: dict[str, Any]) -> RequestSpec:
        return cls(d["custom_id"], d["url"], d.get("params", {}), d.get("prompt"), d.get("messages"))

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params)

    def prompt_spec(self) -> PromptSpec:
        """What the model-dependent stage (`harvest.protocol.prepare`) takes."""
        return PromptSpec(self.url, self.prompt, self.messages, self.params)


def job_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """A job's sampling defaults (SamplingParams field names), checked as a body's fields are."""
    try:
        return check_sampling(defaults)
    except InvalidRequest as exc:
        raise BadRequest(f"job sampling defaults: {exc}") from None


def sampling_from(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The body's SamplingParams fields over the job defaults; BadRequest names the bad field."""
    try:
        params = {**check_sampling(defaults), **check_sampling(body, only_sampling=False)}
        SamplingParams(**params)
    except (InvalidRequest, ValueError) as exc:
        raise BadRequest(str(exc)) from None
    return params


def parse_json(raw: bytes) -> Any:
    """One JSON line; BadRequest for anything Python's json would take that JSON does not
    (NaN, Infinity) or that Python cannot hold (integers of more than 4300 digits)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and the int-digit limit
        raise BadRequest(f"malformed JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def spec_from_body(custom_id: str, url: str, body: Any, defaults: dict[str, Any]) -> RequestSpec:
    """A request body through the translator the HTTP routes use, over checked job defaults."""
    if isinstance(body, dict) and body.get("stream"):
        raise BadRequest("stream is not supported in batch requests")
    try:
        spec = parse_body(url, body)
        params = {**defaults, **spec.params}
        SamplingParams(**params)
    except (InvalidRequest, ValueError) as exc:
        raise BadRequest(str(exc)) from None
    return RequestSpec(custom_id, spec.url, params, spec.prompt, spec.messages)


def parse_batch_line(obj: Any, defaults: dict[str, Any]) -> RequestSpec:
    """One OpenAI Batch API request object -> RequestSpec, or BadRequest. `defaults` are
    checked job defaults (`job_defaults`)."""
    if not isinstance(obj, dict):
        raise BadRequest("expected a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadRequest("custom_id must be a non-empty string")
    check_custom_id(custom_id)
    if obj.get("method", "POST") != "POST":
        raise BadRequest(f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise BadRequest(f"unknown url {url!r}; expected {' or '.join(URLS)}")
    return spec_from_body(custom_id, url, obj.get("body"), defaults)


def parse_item(item: Any, index: int, defaults: dict[str, Any]) -> RequestSpec:
    """A Python list item: prompt string, chat-message list, or batch request dict."""
    if isinstance(item, str):
        return spec_from_body(f"request-{index}", COMPLETIONS, {"prompt": item}, defaults)
    if isinstance(item, list):
        return spec_from_body(f"request-{index}", CHAT, {"messages": item}, defaults)
    if isinstance(item, dict) and "custom_id" in item:
        return parse_batch_line(item, defaults)
    raise BadRequest("expected a prompt string, a list of chat messages or a batch request object")


def _errors_as_values(
    pairs: Iterable[tuple[int, Any]], parse: Callable[[int, Any], RequestSpec], unit: str
) -> Iterator[tuple[int, RequestSpec | InputError]]:
    for line, raw in pairs:
        try:
            yield line, parse(line, raw)
        except BadRequest as exc:
            cid = raw.get("custom_id") if isinstance(raw, dict) else None
            yield line, InputError(line, str(exc), cid if isinstance(cid, str) else None, unit)


def read_items(
    items: Iterable[Any], defaults: dict[str, Any]
) -> Iterator[tuple[int, RequestSpec | InputError]]:
    """A Python list; item N (1-based) without its own custom_id becomes `request-{N-1}`."""
    defaults = _checked(defaults)
    numbered = ((i + 1, item) for i, item in enumerate(items))
    return _errors_as_values(numbered, lambda line, item: parse_item(item, line - 1, defaults), "item")


def read_batch_jsonl(path: Path, defaults: dict[str, Any]) -> Iterator[tuple[int, RequestSpec | InputError]]:
    """OpenAI Batch JSONL, one line in memory at a time; blank lines are skipped."""
    defaults = _checked(defaults)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = parse_json(raw)
            except BadRequest as exc:
                yield line_no, InputError(line_no, str(exc))
                continue
            yield from _errors_as_values([(line_no, obj)], lambda _, o: parse_batch_line(o, defaults), "line")


def check_custom_id(custom_id: str) -> str:
    try:
        return check_text(custom_id, "custom_id")
    except ValueError as exc:  # results files are UTF-8: an id with a surrogate could not be written
        raise BadRequest(str(exc)) from None


def _checked(defaults: dict[str, Any]) -> dict[str, Any]:
    """Job defaults checked once per input; bad ones reject the input as a whole."""
    from harvest.queue.errors import InvalidInputError  # errors.py names InputError from here

    try:
        return job_defaults(defaults)
    except BadRequest as exc:
        raise InvalidInputError([InputError(0, str(exc))]) from None
