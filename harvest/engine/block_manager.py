"""Paged KV bookkeeping: which fixed-size blocks of the pool each request holds, and which
full blocks are cached for reuse by any request with the same prefix (prefix caching).

A full block is named by a hash chained over its token ids and its prefix's hash, so equal
hashes mean equal KV. Blocks are reference-counted: a cached block may sit in several
block tables at once. Only full, computed blocks are ever shared; the block a sequence is
still writing is private to it, so nobody writes into a shared block. A block whose last
holder lets go keeps its hash and stays findable until the pool needs it: blocks with no
hash are handed out first, then cached ones least-recently-freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from harvest.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The name of a full block: its tokens after the prefix whose hash is `parent`.
    128 bits, so two different prefixes never share a name in practice."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Reference-counted blocks of `block_size` token slots, with a hash index of full ones.

    `salt` goes into the first block's hash: anything besides the tokens that changes the KV
    (the model and dtype; an adapter id once there are adapters). Failure is a return value;
    who gets preempted when blocks run out is the scheduler's call.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: str = "") -> None:  # fmt: skip
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free and holding no cached prefix
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, cached; oldest first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._content: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # parent hash, tokens

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can get now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    # ------------------------------------------------------------------ prefix cache

    def _hashes(self, request: Request, n: int) -> list[bytes]:
        """The hashes of the request's first `n` full blocks (memoized: tokens only grow)."""
        hashes, bs = request.block_hashes, self.block_size
        n = min(n, request.num_tokens // bs)  # a partial block has no name
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(
                block_hash(hashes[-1] if hashes else self._root, request.token_ids[i * bs : (i + 1) * bs])
            )
        return hashes[:n]

    def cached_prefix(self, request: Request) -> list[int]:
        """The longest run of cached blocks holding the request's leading tokens, leaving at
        least one token to compute (the request samples from the last one's logits)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in self._hashes(request, (request.num_tokens - 1) // self.block_size):
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Offer the request's newly computed full blocks to the cache (after its step).

        A block whose hash is already cached (two requests computed the same prefix side by
        side) stays private and unnamed: its holder keeps it, the index keeps the first."""
        if not self.enable_prefix_caching:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        if full <= request.num_cached_blocks:
            return
        hashes = self._hashes(request, full)
        bs = self.block_size
        for i in range(request.num_cached_blocks, full):
            block, h = request.block_table[i], hashes[i]
            if block in self._hash_of or h in self._by_hash:
                continue
            self._by_hash[h] = block
            self._hash_of[block] = h
            parent = hashes[i - 1] if i else self._root
            self._content[block] = (parent, tuple(request.token_ids[i * bs : (i + 1) * bs]))
        request.num_cached_blocks = full

    # ------------------------------------------------------------------ allocation

    def allocate(self, request: Request, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Grow `request.block_table` to cover `num_tokens` slots; all or nothing.

        `cached` (from `cached_prefix`, for a request holding no blocks yet) becomes the head
        of its table, shared with whoever else holds those blocks."""
        assert not cached or not request.block_table, "a cached prefix goes into an empty table"
        reclaimed = sum(self._ref[b] == 0 for b in cached)  # free now, but taken, not handed out
        needed = max(0, cdiv(num_tokens, self.block_size) - len(request.block_table) - len(cached))
        if needed > self.num_free_blocks - reclaimed:
            return False
        for block in cached:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            request.block_table.append(block)
        if cached:
            request.num_cached_blocks = len(cached)
        for _ in range(needed):
            block = self._take_free()
            self._ref[block] = 1
            request.block_table.append(block)
        return True

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)  # least recently freed
        del self._by_hash[self._hash_of.pop(block)]
        del self._content[block]
        return block

    def free(self, request: Request) -> None:
        """Let go of the request's blocks; those no one else holds become free. Tail blocks
        go first so that, among one request's blocks, the shared prefix is evicted last."""
        for block in reversed(request.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        request.block_table = []
        request.num_cached_blocks = 0

    # ------------------------------------------------------------------ checks

    def check_integrity(self, requests: Iterable[Request] | None = None) -> None:
        """free + used == total; no block both free and held; the hash index names each
        cached block by the tokens it holds; with `requests` (all that hold blocks), each
        block's ref count is the number of block tables holding it and each shared block
        holds that request's tokens at that position."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & self._evictable.keys(), "a block is both free and cached-free"
        free |= self._evictable.keys()
        held = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        assert all(r >= 0 for r in self._ref), "negative ref count"
        assert not free & held, "a block is both free and referenced"
        assert len(free) + len(held) == self.num_blocks, "blocks leaked"
        assert not free & self._hash_of.keys() - self._evictable.keys(), (
            "a cached free block is not evictable"
        )
        assert all(self._hash_of.get(b) == h for h, b in self._by_hash.items()), "hash index out of step"
        assert len(self._hash_of) == len(self._by_hash) == len(self._content), "hash index out of step"
        for block, (parent, tokens) in self._content.items():
            assert len(tokens) == self.block_size, f"block {block} is cached but not full"
            assert block_hash(parent, tokens) == self._hash_of[block], f"block {block} holds other tokens"
        if requests is None:
            return
        holders = [0] * self.num_blocks
        bs = self.block_size
        for req in requests:
            hashes = self._hashes(req, len(req.block_table))
            for i, block in enumerate(req.block_table):
                holders[block] += 1
                if block in self._content:
                    assert i < len(hashes) and self._hash_of[block] == hashes[i], (
                        f"{req.request_id}: block {block} is cached for another prefix"
                    )
                    assert tuple(req.token_ids[i * bs : (i + 1) * bs]) == self._content[block][1]
        for block, (n, ref) in enumerate(zip(holders, self._ref)):
            assert n == ref, f"block {block}: ref count {ref}, held by {n} block tables"
