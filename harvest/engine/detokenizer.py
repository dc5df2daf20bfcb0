"""Incremental detokenization with stop strings, for requests that stream text.

Output ids are decoded after the last few prompt tokens, which are then cut off. Decoded
alone, a SentencePiece (Metaspace) tokenizer such as Llama 2's or Mistral's drops the
leading space of the first token: "▁Paris" reads "Paris", after the prompt " Paris".
"""

from __future__ import annotations

CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the output


def decode_output(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The output's text as it reads after its prompt."""
    context = prompt_ids[-CONTEXT_TOKENS:]
    prefix = tokenizer.decode(context, skip_special_tokens=True)
    return tokenizer.decode(context + output_ids, skip_special_tokens=True)[len(prefix) :]


class Detokenizer:
    """Decodes a growing list of token ids a small window at a time.

    Text is released only once it is complete UTF-8 and cannot be the start of a stop
    string; a stop string ends the text (the string itself is not included).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = list((prompt_ids or [])[-CONTEXT_TOKENS:])  # context, then the output
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything decoded so far (stop string cut off once found)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that became final."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._check_stop()
        end = len(self.text) if self.stopped else max(self.emitted, len(self.text) - self.hold_back)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def flush(self) -> str:
        """Release what was held back (the request ended). Bytes of an unfinished UTF-8
        character come out as U+FFFD, exactly as decoding the whole output would show them."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

    def _check_stop(self) -> None:
        if self.stopped or not self.stop:
            return
        # only the newly added tail (plus an overlap) can contain a new match
        start = max(0, self.emitted - self.hold_back)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
