"""Paged KV bookkeeping: which fixed-size blocks of the pool each request owns."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from harvest.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """A free list over `num_blocks` blocks of `block_size` token slots.

    Failure is a return value; who gets preempted when blocks run out is the scheduler's call.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owner)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Extra blocks `request` needs so its block table covers `num_tokens` slots."""
        return max(0, cdiv(num_tokens, self.block_size) - len(request.block_table))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow `request.block_table` to cover `num_tokens` slots; all or nothing."""
        needed = self.blocks_needed(request, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block = self._free.popleft()
            self._owner[block] = request.request_id
            request.block_table.append(block)
        return True

    def free(self, request: Request) -> None:
        for block in request.block_table:
            del self._owner[block]
            self._free.append(block)
        request.block_table = []

    def check_integrity(self, requests: Iterable[Request] | None = None) -> None:
        """free + used == total, no block owned twice, and owners agree with block tables."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & self._owner.keys(), "a block is both free and owned"
        assert len(free) + len(self._owner) == self.num_blocks, "blocks leaked"
        seen: set[int] = set()
        for req in requests or ():
            for block in req.block_table:
                assert block not in seen, f"block {block} in two block tables"
                assert self._owner.get(block) == req.request_id, f"block {block} owner mismatch"
                seen.add(block)
        if requests is not None:
            assert seen == self._owner.keys(), "owned blocks not in any block table"
