"""OpenAI request bodies (completions, chat) and their translation into a `PromptSpec`.

One translator for every way in: the HTTP routes validate the JSON body with these
models, the offline readers (batch JSONL lines, table rows, Python lists) validate each
line's body with the same models, so a body gets the same verdict and the same message
on both paths. What depends on the model (token ids against the vocabulary, context
length, the chat template) is checked later, in `prepare.py`, also shared.

Bounds, each refused naming its field:
- temperature: 0 (greedy) or in [1e-3, 2]. 2 is OpenAI's bound; below 1e-3 the logits
  divided by the temperature overflow float32 and the sampler produces NaN.
- NaN and +-inf: refused in every float field.
- top_p in (0, 1]; top_k -1 or 0 (off) or >= 1; max_tokens >= 1; n must be 1.
- seed, max_tokens and top_k within int64.
- stop: a string or a list of at most 16 non-empty strings of at most 256 characters.
- prompt token ids and stop_token_ids: integers in [0, 2^63) here; below the vocabulary
  size once the model is known.
- every string (prompt, message contents, stop strings, model, ...): valid Unicode (no
  unpaired UTF-16 surrogates, which JSON's \\ud800 escapes can produce and which neither
  a tokenizer nor a UTF-8 response or results file can hold).
- chat roles: system, developer (read as system), user, assistant, tool (if the model's
  template takes it); content as a string or a list of text parts, joined.
- service_tier: "auto", "default" (online) or "flex" (the offline class: harvested
  capacity, preemptible, outside the online SLO); see `request_class_of`.

Requests validate strictly (no "16" for 16) so that a wrong type is an error naming the
field, as OpenAI does. Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from harvest.protocol.errors import InvalidRequest, from_pydantic
from harvest.protocol.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOKEN_ID,
    MIN_TEMPERATURE,
)
from harvest.protocol.types import RequestClass

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)


def check_text(value: str, what: str = "text") -> str:
    """`value` unless it holds an unpaired surrogate (valid JSON, but not Unicode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds an unpaired UTF-16 surrogate at offset {exc.start}") from None
    return value


Text = Annotated[str, AfterValidator(check_text)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """What completions and chat completions share."""

    # every string is Text: one that cannot be encoded would fail wherever it is echoed
    model: Text | None = None  # required online (the route checks it), the job's model offline
    # ints are bounded to int64: an unbounded one would fail later, in the JSON of a shard
    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float = Field(default=1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX)  # extension (vLLM): 0 or -1 disables
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: list[str] | None = None  # null: the default (offline, the job's), not "no stop strings"
    stop_token_ids: list[TokenId] = Field(default_factory=list)  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # OpenAI's tier: "flex" runs in the offline class (a batch line is offline whatever it says)
    service_tier: Literal["auto", "default", "flex"] | None = None

    @field_validator("temperature")
    @classmethod
    def _finite_logits(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        """Everything is decided here, so a bad value gives one error naming `stop`."""
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or any(not isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(value)}")
        for s in value:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
            check_text(s, "a stop string")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: Text | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """A string, token ids, or a list holding exactly one of those."""
        # everything is decided here, so a bad prompt gives one error and not one per union member
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            value = value[0]
        is_ids = isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        )
        if not (isinstance(value, str) or is_ids):
            raise ValueError("prompt must be a string, a list of token ids, or a list with one of those")
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, str):
            return check_text(value, "prompt")
        if any(not 0 <= t <= MAX_TOKEN_ID for t in value):
            raise ValueError("prompt token ids must be integers in [0, 2^63)")
        return value


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> Any:
        """Content parts (`[{"type": "text", "text": ...}]`) are joined; only text is supported."""
        if value is None:
            return ""  # an assistant turn that only called tools
        if isinstance(value, list):
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise ValueError("only text content parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string `text`")
                texts.append(part["text"])
            return "".join(texts)
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = None


Body = CompletionRequest | ChatCompletionRequest


@dataclass
class PromptSpec:
    """A translated request, model-independent: what to prompt with and how to sample.

    `params` holds only the SamplingParams fields the body set (offline, they go over the
    job's defaults); `max_tokens_param` is the field an error about max_tokens names.
    """

    url: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_tokens_param: str = "max_tokens"


# body field -> SamplingParams field, for the fields that map one to one
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


def sampling_fields(body: SamplingFields) -> dict[str, Any]:
    """The SamplingParams fields `body` set explicitly (a null counts as unset)."""
    params = {name: getattr(body, name) for name in _SAMPLING if name in body.model_fields_set}
    params = {name: value for name, value in params.items() if value is not None}
    if "top_k" in params:
        params["top_k"] = max(params["top_k"], 0)  # -1 and 0 both mean off
    if "stop" in params:
        params["stop"] = list(params["stop"])
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        params["max_tokens"] = body.max_completion_tokens
    return params


def translate(body: Body) -> PromptSpec:
    """A validated body -> PromptSpec; InvalidRequest for options harvest does not serve."""
    _reject_unsupported(body)
    params = sampling_fields(body)
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs is not None:
            raise InvalidRequest("logprobs are not supported.", "logprobs")
        # templates rarely know OpenAI's newer "developer" role; it means what "system" means
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]  # fmt: skip
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return PromptSpec(CHAT, messages=messages, params=params, max_tokens_param=param)
    if body.echo:
        raise InvalidRequest("echo is not supported.", "echo")
    if body.logprobs is not None:
        raise InvalidRequest("logprobs are not supported.", "logprobs")
    if body.suffix:
        raise InvalidRequest("suffix is not supported.", "suffix")
    if body.best_of not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", "best_of")
    return PromptSpec(COMPLETIONS, prompt=body.prompt, params=params)


def request_class_of(body: SamplingFields) -> RequestClass:
    """The engine class an online body runs in: offline for `service_tier: "flex"`."""
    return RequestClass.OFFLINE if body.service_tier == "flex" else RequestClass.ONLINE


def served_tier(request_class: RequestClass) -> str:
    """The `service_tier` a response echoes: the tier that served it, as OpenAI reports it."""
    return "flex" if request_class is RequestClass.OFFLINE else "default"


def parse_body(url: str, body: Any) -> PromptSpec:
    """A raw body (a JSON object as Python data) for `url` -> PromptSpec, or InvalidRequest."""
    if url not in URLS:
        raise InvalidRequest(f"unknown url {url!r}; expected {' or '.join(URLS)}", "url")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", "body")
    model = ChatCompletionRequest if url == CHAT else CompletionRequest
    try:
        validated = model.model_validate(body)
    except ValidationError as exc:
        raise from_pydantic(exc.errors()[0]) from None
    return translate(validated)


def check_sampling(values: dict[str, Any], only_sampling: bool = True) -> dict[str, Any]:
    """SamplingParams fields given by name (a job's defaults) -> the same, checked as a body's
    fields are; InvalidRequest names the first bad one, or (`only_sampling`) an unknown name."""
    unknown = sorted(set(values) - set(_SAMPLING))
    if unknown and only_sampling:
        raise InvalidRequest(f"unknown sampling parameter(s) {unknown}; known: {list(_SAMPLING)}", unknown[0])
    try:
        validated = SamplingFields.model_validate(values)
    except ValidationError as exc:
        raise from_pydantic(exc.errors()[0]) from None
    return sampling_fields(validated)


def _reject_unsupported(body: SamplingFields) -> None:
    if body.n != 1:
        raise InvalidRequest("Only n=1 is supported.", "n")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true.", "stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidRequest(f"{name} is not supported (only 0).", name)
    if body.logit_bias:
        raise InvalidRequest("logit_bias is not supported.", "logit_bias")
