"""The name of one KV checkpoint, as it travels between engines and through Redis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CheckpointHandle:
    """Checkpoint `key` in store `store` holds the KV of a request's first `tokens` tokens.

    `store` names the store that can hand it over (a node's keeper actor, or "host" for an
    engine's in-memory store); `tokens` is what the maker had saved when it reported the
    handle, an upper bound: whoever adopts it trusts only the blocks it finds.
    """

    store: str
    key: str
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "key": self.key, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointHandle:
        try:
            return cls(str(d["store"]), str(d["key"]), int(d["tokens"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a checkpoint handle: {d!r}") from exc
