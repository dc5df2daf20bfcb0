"""Offline request inputs: parse and validate one request at a time, never a whole file.

Every reader yields `(line, RequestSpec | InputError)` so that validation can report the
line number and reason of each bad line and the submitter can stream valid ones into
shards. Accepted: Python lists (prompt strings, chat-message lists, batch dicts), OpenAI
Batch JSONL, and tables (Parquet, CSV, JSONL) with a prompt column and template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harvest.engine import SamplingParams

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)
ROLES = {"system", "user", "assistant", "tool", "developer"}
# body field -> (SamplingParams field, accepted python types)
SAMPLING_FIELDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "max_tokens": ("max_tokens", (int,)),
    "max_completion_tokens": ("max_tokens", (int,)),
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),
    "seed": ("seed", (int,)),
    "stop": ("stop", (str, list)),
    "stop_token_ids": ("stop_token_ids", (list,)),
    "ignore_eos": ("ignore_eos", (bool,)),
}


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
        from harvest.engine.sampling import SamplingParams

        return SamplingParams(**self.params)


def sampling_from(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The request's SamplingParams fields over the job defaults; BadRequest names the bad field."""
    params = dict(defaults)
    for name, (target, types) in SAMPLING_FIELDS.items():
        if name not in body or body[name] is None:
            continue
        value = body[name]
        # bool is an int subclass in Python, but `"max_tokens": true` is a mistake
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadRequest(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        params[target] = value
    if body.get("n", 1) != 1:
        raise BadRequest(f"n must be 1, got {body['n']!r}")
    if body.get("stream"):
        raise BadRequest("stream is not supported in batch requests")
    try:
        key = tuple(params.items())  # a job's requests mostly share one combination: check it once
        known = key in _VALID_PARAMS
    except TypeError:  # a list value (stop strings): not hashable, check it every time
        key, known = None, False
    if not known:
        # imported here: the engine package pulls in torch and transformers (seconds), and the
        # CLI's read-only commands should not pay for that
        from harvest.engine.sampling import SamplingParams

        try:
            SamplingParams(**params)
        except (TypeError, ValueError) as exc:
            raise BadRequest(str(exc)) from None
        if key is not None and len(_VALID_PARAMS) < 4096:
            _VALID_PARAMS.add(key)
    return params


_VALID_PARAMS: set[tuple] = set()  # SamplingParams field combinations known to be valid


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be an object with a known role and string content")
    return messages


def check_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the OpenAI API also takes a one-element list
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty")
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise BadRequest("prompt must be a non-empty string or list of token ids")


def parse_batch_line(obj: Any, defaults: dict[str, Any]) -> RequestSpec:
    """One OpenAI Batch API request object -> RequestSpec, or BadRequest."""
    if not isinstance(obj, dict):
        raise BadRequest("expected a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadRequest("custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise BadRequest(f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        raise BadRequest(f"unknown url {url!r}; expected {' or '.join(URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    params = sampling_from(body, defaults)
    if url == CHAT:
        return RequestSpec(custom_id, url, params, messages=check_messages(body.get("messages")))
    return RequestSpec(custom_id, url, params, prompt=check_prompt(body.get("prompt")))


def parse_item(item: Any, index: int, defaults: dict[str, Any]) -> RequestSpec:
    """A Python list item: prompt string, chat-message list, or batch request dict."""
    if isinstance(item, str):
        return RequestSpec(
            f"request-{index}", COMPLETIONS, sampling_from({}, defaults), prompt=check_prompt(item)
        )
    if isinstance(item, list):
        return RequestSpec(
            f"request-{index}", CHAT, sampling_from({}, defaults), messages=check_messages(item)
        )
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
    numbered = ((i + 1, item) for i, item in enumerate(items))
    return _errors_as_values(numbered, lambda line, item: parse_item(item, line - 1, defaults), "item")


def read_batch_jsonl(path: Path, defaults: dict[str, Any]) -> Iterator[tuple[int, RequestSpec | InputError]]:
    """OpenAI Batch JSONL, one line in memory at a time; blank lines are skipped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield line_no, InputError(line_no, f"malformed JSON: {exc}")
                continue
            yield from _errors_as_values([(line_no, obj)], lambda _, o: parse_batch_line(o, defaults), "line")
