from __future__ import annotations

import pytest

from llama_mpi.mpi_server.engine.block_manager import BlockManager
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.engine.sequence import Sequence
from tests.mpi_server.fakes import FakeDetokenizer, FakeTokenizer


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), FakeDetokenizer(FakeTokenizer()))


def compute(bm: BlockManager, s: Sequence, n: int | None = None) -> None:
    """What a step does: allocate, 'run' the tokens, register full blocks."""
    n = s.num_uncomputed if n is None else n
    assert bm.allocate(s, n)
    s.num_cached += n
    bm.commit(s)


def test_alloc_and_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq("a", list(range(10)))
    assert bm.blocks_needed(a, 10) == 3
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.allocate(a, 2)  # 12 tokens still fit 3 blocks
    assert len(a.block_table) == 3
    b = seq("b", list(range(100, 110)))
    assert not bm.allocate(b, 10)  # needs 3, one free: nothing taken
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.free_seq(a)
    assert a.block_table == [] and a.num_cached == 0 and bm.num_free_blocks == 4
    assert bm.allocate(b, 10) and bm.num_used_blocks == 3


def test_prefix_hit_shares_blocks_with_ref_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    system = list(range(20, 28))  # two full blocks
    a = seq("a", system + [1, 2, 3])
    assert bm.attach_prefix(a) == 0
    compute(bm, a)
    b = seq("b", system + [7, 8])
    assert bm.attach_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    assert bm.prefix_hits == 8 and bm.prefix_queries == 11 + 10
    compute(bm, b)
    assert b.num_cached == 10 and b.block_table[2] != a.block_table[2]
    bm.free_seq(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_last_token_is_always_recomputed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(8)))
    compute(bm, a)
    bm.free_seq(a)
    again = seq("a2", list(range(8)))  # same 8 tokens, block aligned
    assert bm.attach_prefix(again) == 4  # the block holding the last token is not taken
    assert again.num_uncomputed == 4


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    for rid, tokens in [("old", [1, 2, 3]), ("new", [5, 6, 7])]:  # one full block each
        s = seq(rid, tokens)
        compute(bm, s)
        bm.free_seq(s)
    assert len(bm.cached) == 2 and bm.num_free_blocks == 3  # cached, yet free
    compute(bm, seq("x", [9, 9]))  # takes the unhashed block: nothing evicted
    assert len(bm.cached) == 3
    compute(bm, seq("y", [8, 8]))  # must evict: the least recently freed goes
    assert bm.attach_prefix(seq("o", [1, 2, 0])) == 0
    assert bm.attach_prefix(seq("n", [5, 6, 0])) == 2


def test_unhashed_blocks_are_handed_out_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq("a", [1, 2, 3])
    compute(bm, a)  # block 0 hashed, block 1 holds a partial block
    bm.free_seq(a)
    b = seq("b", [4])
    compute(bm, b)
    assert b.block_table == [1]  # a's partial block, not its cached full one
    assert bm.attach_prefix(seq("c", [1, 2, 5])) == 2


def test_identical_prefix_computed_twice_keeps_first_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq("a", [1, 2, 3]), seq("b", [1, 2, 4])
    compute(bm, a)
    compute(bm, b)  # same first block computed concurrently
    assert bm.cached[a.block_hashes[0]] == a.block_table[0]
    bm.free_seq(a)
    bm.free_seq(b)
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_prefix_caching_off() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq("a", [1, 2, 3])
    compute(bm, a)
    assert bm.attach_prefix(seq("b", [1, 2, 3])) == 0 and not bm.cached
    assert bm.prefix_queries == 3 and bm.prefix_hits == 0


def test_double_free_is_an_error() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq("a", [1])
    compute(bm, a)
    table = list(a.block_table)
    bm.free_seq(a)
    a.block_table = table
    with pytest.raises(RuntimeError):
        bm.free_seq(a)


def test_a_block_is_matched_only_after_the_same_prefix() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    compute(bm, seq("a", [1, 2, 3, 4, 5]))  # blocks (1, 2), (3, 4)
    assert bm.attach_prefix(seq("b", [3, 4, 9])) == 0  # (3, 4) but not after (1, 2)
    assert bm.attach_prefix(seq("c", [1, 2, 3, 4, 9])) == 4
