"""The model-dependent stage: PromptSpec + tokenizer + context length -> engine inputs.

Shared by the HTTP routes and the offline worker (`ShardRun.prepare`), so a prompt is
tokenized, templated and bounded the same way on both. Checked here, where the model is
known: token ids (prompt, stop_token_ids) below the vocabulary size, a prompt that
leaves room for at least one token, and prompt + max_tokens within `max_model_len`, so
a request never fails half-way for lack of context. Errors are InvalidRequest: a 400
online, an `invalid_request` error record offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from harvest.protocol.errors import InvalidRequest
from harvest.protocol.requests import CHAT, PromptSpec
from harvest.protocol.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EngineInputs:
    prompt_token_ids: list[int]
    params: SamplingParams


def engine_inputs(
    spec: PromptSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_model_len: int,
    default_max_tokens: int | None = 16,
) -> EngineInputs:
    """`default_max_tokens` applies when `spec.params` has none (None: whatever context is
    left, as OpenAI's chat does); a default is trimmed to fit, an asked-for value is not."""
    vocab = len(tokenizer)
    if spec.url == CHAT:
        ids = chat_prompt_ids(spec.messages or [], tokenizer)
        prompt_param = "messages"
    elif isinstance(spec.prompt, str):
        ids = tokenizer.encode(spec.prompt)  # as the engine itself would tokenize it
        prompt_param = "prompt"
    else:
        ids, prompt_param = list(spec.prompt or []), "prompt"
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab}).", "prompt")
    if not ids:
        raise InvalidRequest("prompt must not be empty.", prompt_param)
    if any(not 0 <= t < vocab for t in spec.params.get("stop_token_ids", [])):
        raise InvalidRequest(f"stop_token_ids must be in [0, {vocab}).", "stop_token_ids")
    _check_prompt_length(len(ids), max_model_len, prompt_param)
    requested = spec.params.get("max_tokens")
    max_tokens = _max_tokens(requested, spec.max_tokens_param, len(ids), max_model_len, default_max_tokens)
    try:
        params = SamplingParams(**{**spec.params, "max_tokens": max_tokens})
    except (TypeError, ValueError) as exc:  # a payload stored by an older, laxer version
        raise InvalidRequest(str(exc)) from None
    return EngineInputs(ids, params)


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's chat template with the assistant turn opened, tokenized as rendered."""
    if not tokenizer.chat_template:
        raise InvalidRequest("This model has no chat template; use /v1/completions.", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise InvalidRequest(f"Invalid messages for this model's chat template: {exc}", "messages") from exc
    # the template already wrote any BOS it wants; adding special tokens would double it
    return tokenizer.encode(text, add_special_tokens=False)


def _check_prompt_length(prompt_len: int, max_model_len: int, param: str) -> None:
    if prompt_len >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your {param} "
            f"has {prompt_len} tokens, which leaves no room for the completion. Please shorten it.",
            param,
            code="context_length_exceeded",
        )


def _max_tokens(requested: int | None, param: str, prompt_len: int, max_model_len: int,
                default: int | None) -> int:  # fmt: skip
    room = max_model_len - prompt_len
    if requested is None:
        # a default the client did not ask for is trimmed to fit, never an error
        return room if default is None else min(default, room)
    if requested > room:
        raise InvalidRequest(
            f"{param} is too large: {requested}. This model's maximum context length is "
            f"{max_model_len} tokens and your prompt has {prompt_len}, so at most {room} "
            "completion tokens fit.",
            param,
        )
    return requested
