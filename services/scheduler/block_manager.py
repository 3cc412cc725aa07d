"""KV block ids, reference counts and the automatic prefix cache.

A full block is identified by a chained hash of its tokens and every token before it, so equal
hashes mean equal prefixes; a hit is still confirmed against the block's stored tokens, which
makes a hash collision a miss instead of wrong output. Freed blocks keep their contents and
hash until they are reused, in LRU order: blocks holding no cached prefix go first, then the
tails of sequences before their heads (freed in reverse), so shared prefixes live longest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.scheduler.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front is reused first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.query_tokens = 0  # prefix-cache statistics, in tokens (vLLM's counters)
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Block ids and hashes of the longest cached run of full blocks at the start of token_ids.
        At least one token is left uncached: the last prompt token must run to produce logits."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        ids: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, chunk)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            ids.append(block_id)
            hashes.append(parent)
        return ids, hashes

    def can_admit(self, cached_ids: list[int], num_tokens: int) -> bool:
        """Whether a waiting request reusing cached_ids can get blocks for num_tokens tokens."""
        idle_hits = sum(1 for b in cached_ids if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - len(cached_ids) <= len(self.free) - idle_hits

    def admit(self, req: Request, cached_ids: list[int], cached_hashes: list[int], num_tokens: int) -> None:
        for block_id in cached_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        req.block_ids = list(cached_ids)
        req.block_hashes = list(cached_hashes)
        if self.enable_prefix_caching:
            self.query_tokens += req.num_tokens
            self.hit_tokens += len(cached_ids) * self.block_size
        self.grow(req, num_tokens)

    def can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(req.block_ids) <= len(self.free)

    def grow(self, req: Request, num_tokens: int) -> None:
        """Give req enough blocks for num_tokens tokens (the caller checked can_grow)."""
        for _ in range(self.blocks_needed(num_tokens) - len(req.block_ids)):
            req.block_ids.append(self._take_free())

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def release(self, req: Request) -> None:
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out before cached blocks
                    self.free.move_to_end(block_id, last=False)
        req.block_ids = []
        req.block_hashes = []
        req.num_sent_blocks = 0

    def cache_computed_blocks(self, req: Request) -> None:
        """Register req's blocks that became full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            chunk = tuple(req.token_ids[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, chunk)
            req.block_hashes.append(parent)
            block = self.blocks[req.block_ids[i]]
            if block.hash is None and parent not in self.cached:
                block.hash, block.token_ids = parent, chunk
                self.cached[parent] = block.block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block not in use (all of them once every request is released)."""
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].hash == h}
