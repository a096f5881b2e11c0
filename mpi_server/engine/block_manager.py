"""Which KV-pool blocks each sequence owns, with ref counts and a prefix cache.

The engine only manages block ids; the model's ``LatentKVPool`` holds the data.

Prefix caching: once a block is full and computed, it is registered under a hash of
(parent block's hash, the block's token ids), so the hash names the whole prefix up to that
block. A new sequence whose tokens start with the same blocks (a shared system prompt, the
previous chat turn, its own tokens after a preemption) takes those blocks by reference and
skips computing them. Only blocks strictly before the last token are matched: the last token
is always recomputed so the step has logits to sample from, and no shared block is ever
written. Freed blocks keep their hash and stay reusable until their space is needed; the
free list is in LRU order (evict from the front), with unhashed blocks and prefix tails
evicted before prefix heads.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llama_mpi.mpi_server.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("the block manager needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # prefix hash -> block id
        self.prefix_queries = 0  # tokens looked up in the prefix cache, cumulative
        self.prefix_hits = 0  # tokens found there, cumulative

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached-but-unused ones included (they are evictable)."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_cached + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` room for its next ``num_new_tokens`` tokens; False (and no change) if
        the pool cannot."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_free() for _ in range(need))
        return True

    def attach_prefix(self, seq: Sequence) -> int:
        """Start a block-less sequence on the cached blocks its tokens begin with.

        Returns the number of tokens now cached (a multiple of the block size, less than
        ``seq.num_tokens``); ``seq.num_cached`` is set to it. Every call counts towards the
        query/hit metrics, a re-admission after preemption included.
        """
        if seq.block_table or seq.num_cached:
            raise RuntimeError(f"{seq.request_id}: attach_prefix on a sequence with blocks")
        self.prefix_queries += seq.num_tokens
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent: bytes | None = None
        for i in range((seq.num_tokens - 1) // bs):  # never the block holding the last token
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            bid = self.cached.get(h)
            if bid is None:
                break
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
            parent = h
        seq.num_cached = len(seq.block_table) * bs
        self.prefix_hits += seq.num_cached
        return seq.num_cached

    def commit(self, seq: Sequence) -> None:
        """Register the blocks ``seq`` has just filled, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_cached // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            # Another sequence may have computed the same prefix first: keep its block.
            if h not in self.cached and block.hash is None:
                self.cached[h] = block.id
                block.hash = h

    def free_seq(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its blocks become free (hashed ones stay matchable)."""
        for bid in reversed(seq.block_table):  # tails first: they are evicted before heads
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {bid} freed more often than taken")
            if block.ref_count == 0:
                self.free[bid] = None
                if block.hash is None:  # nothing to reuse: hand it out first
                    self.free.move_to_end(bid, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached = 0

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:  # evict: its contents are about to be overwritten
            if self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return bid
