"""From a validated request body to engine inputs: prompt token ids and `SamplingParams`.

Everything that depends on the model is checked here, before the backend sees the
request: the prompt must leave room for at least one token, and prompt + max_tokens
must fit in `max_model_len`, so a request never fails half-way for lack of context.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from harvest.api.errors import invalid
from harvest.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from harvest.engine import SamplingParams


@dataclass
class EngineInputs:
    prompt_token_ids: list[int]
    params: SamplingParams


def completion_inputs(
    req: CompletionRequest, tokenizer: PreTrainedTokenizerBase, max_model_len: int
) -> EngineInputs:
    _reject_common(req)
    if req.echo:
        raise invalid("echo is not supported.", "echo")
    if req.logprobs is not None:
        raise invalid("logprobs are not supported.", "logprobs")
    if req.suffix:
        raise invalid("suffix is not supported.", "suffix")
    if req.best_of not in (None, 1):
        raise invalid("Only best_of=1 is supported.", "best_of")
    if isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt)  # as the engine itself would tokenize it
    else:
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in req.prompt):
            raise invalid(f"prompt token ids must be in [0, {vocab}).", "prompt")
        ids = list(req.prompt)
    if not ids:
        raise invalid("prompt must not be empty.", "prompt")
    _check_prompt_length(len(ids), max_model_len, "prompt")
    max_tokens = _max_tokens(req.max_tokens, "max_tokens", len(ids), max_model_len, default=16)
    return EngineInputs(ids, _sampling_params(req, max_tokens))


def chat_inputs(
    req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase, max_model_len: int
) -> EngineInputs:
    _reject_common(req)
    if req.logprobs or req.top_logprobs is not None:
        raise invalid("logprobs are not supported.", "logprobs")
    ids = chat_prompt_ids(req, tokenizer)
    _check_prompt_length(len(ids), max_model_len, "messages")
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    # like OpenAI, an unlimited chat completion may use whatever context is left
    max_tokens = _max_tokens(requested, param, len(ids), max_model_len, default=None)
    return EngineInputs(ids, _sampling_params(req, max_tokens))


def chat_prompt_ids(req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's chat template with the assistant turn opened, tokenized as rendered."""
    if not tokenizer.chat_template:
        raise invalid("This model has no chat template; use /v1/completions.", "messages")
    # templates rarely know OpenAI's newer "developer" role; it means what "system" means
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in req.messages]  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise invalid(f"Invalid messages for this model's chat template: {exc}", "messages") from exc
    # the template already wrote any BOS it wants; adding special tokens would double it
    return tokenizer.encode(text, add_special_tokens=False)


def _reject_common(req: SamplingFields) -> None:
    if req.n != 1:
        raise invalid("Only n=1 is supported.", "n")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true.", "stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise invalid(f"{name} is not supported (only 0).", name)
    if req.logit_bias:
        raise invalid("logit_bias is not supported.", "logit_bias")


def _check_prompt_length(prompt_len: int, max_model_len: int, param: str) -> None:
    if prompt_len >= max_model_len:
        raise invalid(
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
        raise invalid(
            f"{param} is too large: {requested}. This model's maximum context length is "
            f"{max_model_len} tokens and your prompt has {prompt_len}, so at most {room} "
            "completion tokens fit.",
            param,
        )
    return requested


def _sampling_params(req: SamplingFields, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        seed=req.seed,
        stop=list(req.stop),
        ignore_eos=req.ignore_eos,
    )
