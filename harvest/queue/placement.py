"""Placement: which shard each request of a job goes into.

In input order, identical prompts far apart are computed once per shard they land in, and
requests sharing a prefix (a system prompt, an instruction, a few-shot block) are spread
over shards that each compute it. Placed by prompt (`JobOptions.group_by_prompt`), a
request follows the earliest request that shares its first 64 characters, within those
the earliest that shares its first 512, then 4096, and last the earliest identical one;
requests that share nothing keep their input order. So identical requests sit side by
side and the shard's dedup computes them once, and the requests sharing a prefix fill as
few shards as they can, in each of which the engine's prefix cache serves it to all but
the first (docs/QUEUE.md).

Submission is torch-free: it knows the prompt's text, not its token ids. So a prompt is
judged by characters of a normal form (chat messages as JSON, token ids as their list);
equal text gives equal ids, and a shared leading text nearly always shared leading ids.
Only the equality of prefixes is used, through Python's string hash (64 bits, one process):
a collision can only misplace a request, never change a result.

A run of identical requests that the shard's dedup would compute once (deterministic
sampling, dedup on) is never split across shards unless it is bigger than a shard: the
shard before it closes early instead. Memory: a few integers per request and one per
distinct prefix, besides the custom_id the validation holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from harvest.protocol.sampling_params import SamplingParams
from harvest.queue.inputs import RequestSpec

PREFIX_CHARS = (64, 512, 4096)  # a prefix level per length: a block of ~16 tokens, then 8x each


def prompt_text(spec: RequestSpec) -> str:
    """The prompt in one normal form: kinds apart, chat messages with their keys sorted."""
    if spec.messages is not None:
        return "chat " + orjson.dumps(spec.messages, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(spec.prompt, str):
        return "text " + spec.prompt
    return "ids " + orjson.dumps(spec.prompt).decode()


def computed_once(spec: RequestSpec, dedup: bool) -> bool:
    """Whether identical copies of this request are computed once in a shard (shard.py's dedup)."""
    if not dedup:
        return False
    params = SamplingParams(**spec.params)
    return params.greedy or params.seed is not None


class Placement:
    """Requests are added in input order (their position is the order of `add`); `shards()`
    then gives the positions each shard holds, shard after shard."""

    def __init__(self, shard_size: int, by_prompt: bool = True, dedup: bool = True) -> None:
        self.shard_size = shard_size
        self.by_prompt = by_prompt
        self.dedup = dedup
        self._first: list[dict[int, int]] = [{} for _ in range(len(PREFIX_CHARS) + 1)]
        self._keys: list[tuple[int, ...]] = []

    def add(self, spec: RequestSpec) -> None:
        position = len(self._keys)
        if not self.by_prompt:
            self._keys.append((position,))
            return
        text = prompt_text(spec)
        key = []
        for chars, first in zip(PREFIX_CHARS, self._first):
            key.append(first.setdefault(hash(text[:chars]), position))
            if len(text) <= chars:
                break  # the longer prefixes are all of it
        if computed_once(spec, self.dedup):
            params = orjson.dumps(spec.params, option=orjson.OPT_SORT_KEYS)
            key.append(self._first[-1].setdefault(hash((text, params)), position))
        else:
            key.append(position)  # no copy of it is shared: it stays where its prefixes put it
        self._keys.append(tuple(key))

    def shards(self) -> Iterator[list[int]]:
        """Positions per shard: the requests sorted by key (ties, identical requests, in input
        order), cut every `shard_size` but never inside a run of identical ones that fits one."""
        order = sorted(range(len(self._keys)), key=self._keys.__getitem__)
        shard: list[int] = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and self._keys[order[end]] == self._keys[order[start]]:
                end += 1
            if shard and len(shard) + end - start > self.shard_size:
                yield shard
                shard = []
            for position in order[start:end]:  # a run bigger than a shard fills shards of its own
                shard.append(position)
                if len(shard) == self.shard_size:
                    yield shard
                    shard = []
            start = end
        if shard:
            yield shard
