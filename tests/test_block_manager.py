"""Block allocator: allocation, release, reference counts, prefix hits and eviction order."""

from services.sampling_params import SamplingParams
from services.scheduler.block_manager import BlockManager
from services.scheduler.request import Request

BS = 4


def req(tokens: list[int], rid: str = "r") -> Request:
    return Request.new(rid, tokens, SamplingParams(), eos_token_ids=[])


def computed(bm: BlockManager, r: Request) -> None:
    """Pretend the worker computed every token of r, then register its full blocks."""
    r.num_computed_tokens = r.num_tokens
    bm.cache_computed_blocks(r)


def test_allocate_and_release_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    r = req(list(range(10)))
    assert bm.can_admit([], 10)
    bm.admit(r, [], [], 10)
    assert len(r.block_ids) == 3 and len(set(r.block_ids)) == 3
    assert bm.num_free == 5
    bm.grow(r, 13)  # crossing into a fourth block
    assert len(r.block_ids) == 4 and bm.num_free == 4
    bm.release(r)
    assert bm.num_free == 8 and r.block_ids == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_cannot_allocate_beyond_pool():
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=False)
    assert not bm.can_admit([], 9)
    r = req(list(range(8)))
    bm.admit(r, [], [], 8)
    assert not bm.can_grow(r, 9)
    assert bm.can_grow(r, 8)


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    shared = list(range(100, 112))  # three full blocks
    a = req(shared + [1, 2], "a")
    bm.admit(a, *bm.find_cached_prefix(a.token_ids), a.num_tokens)
    computed(bm, a)
    b = req(shared + [7, 8, 9], "b")
    ids, hashes = bm.find_cached_prefix(b.token_ids)
    assert ids == a.block_ids[:3]
    bm.admit(b, ids, hashes, b.num_tokens)
    assert [bm.blocks[i].ref_count for i in ids] == [2, 2, 2]
    assert bm.hit_tokens == 12 and bm.query_tokens == a.num_tokens + b.num_tokens
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in ids] == [1, 1, 1]
    bm.release(b)
    assert bm.num_free == 16


def test_full_prompt_hit_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = req(list(range(8)), "a")
    bm.admit(a, [], [], 8)
    computed(bm, a)
    bm.release(a)
    ids, _ = bm.find_cached_prefix(list(range(8)))
    assert len(ids) == 1  # the second block would cover the last prompt token


def test_freed_cached_blocks_survive_until_reused_in_lru_order():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = req(list(range(8)) + [99], "a")  # two full blocks + one partial
    bm.admit(a, [], [], a.num_tokens)
    computed(bm, a)
    head, tail, partial = a.block_ids
    bm.release(a)
    free_order = list(bm.free)
    # blocks without a cached prefix are reused first, then tails before heads
    assert free_order.index(partial) < free_order.index(tail) < free_order.index(head)
    # a later request still hits both cached blocks
    ids, _ = bm.find_cached_prefix(list(range(8)) + [5])
    assert ids == [head, tail]
    # exhausting the pool evicts the tail before the head
    hog = req(list(range(500, 520)), "hog")  # five blocks: the partial, three never used, then the tail
    bm.admit(hog, [], [], 20)
    assert tail in hog.block_ids and head not in hog.block_ids
    ids, _ = bm.find_cached_prefix(list(range(8)) + [5])
    assert ids == [head]


def test_hash_hit_is_verified_against_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = req(list(range(9)), "a")
    bm.admit(a, [], [], 9)
    computed(bm, a)
    # corrupt the stored tokens as a hash collision would look: the hit must be refused
    bm.blocks[a.block_ids[0]].token_ids = (9, 9, 9, 9)
    ids, _ = bm.find_cached_prefix(list(range(9)))
    assert ids == []


def test_no_hits_when_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = req(list(range(9)), "a")
    bm.admit(a, [], [], 9)
    computed(bm, a)
    assert bm.find_cached_prefix(list(range(9))) == ([], [])
