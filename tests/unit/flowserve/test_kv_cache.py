"""KV cache: block pool ref counts and LRU eviction, hash chain, manager ops, host tier, events."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deepserve.flowserve.kv_cache import (
    BlockPool,
    KVCacheManager,
    KVEventRecorder,
    extend_block_hashes,
    hash_block_tokens,
    prompt_block_hashes,
)

BS = 4


@dataclass
class Req:
    request_id: str
    tokens: list[int]
    block_hashes: list[bytes] = field(default_factory=list)
    cache_salt: str = ""

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens


class DictTransport:
    """Fake executor side of the host tier: device blocks are lists, host payloads are copies."""

    def __init__(self, num_blocks: int) -> None:
        self.device: dict[int, list[int]] = {i: [] for i in range(num_blocks)}
        self.copies_out: list[list[int]] = []
        self.copies_in: list[list[int]] = []

    def copy_to_host(self, block_ids: list[int]) -> list[list[int]]:
        self.copies_out.append(list(block_ids))
        return [list(self.device[b]) for b in block_ids]

    def load_from_host(self, block_ids: list[int], payloads: list[list[int]]) -> None:
        self.copies_in.append(list(block_ids))
        for block_id, payload in zip(block_ids, payloads, strict=True):
            self.device[block_id] = list(payload)


def write_kv(transport: DictTransport, kv: KVCacheManager, req: Req) -> None:
    """What a forward step would do: fill the request's blocks with its tokens."""
    for i, block_id in enumerate(kv.block_ids(req.request_id)):
        transport.device[block_id] = req.tokens[i * BS : (i + 1) * BS]


def compute(kv: KVCacheManager, req: Req) -> int:
    """Admit a request like the scheduler does (whole prompt at once) and cache its blocks."""
    match = kv.match_prefix(
        req.tokens, block_hashes=req.block_hashes, max_cached_tokens=len(req.tokens) - 1
    )
    assert kv.alloc(req, len(req.tokens) - match.num_tokens, match)
    kv.cache_blocks(req, len(req.tokens))
    return match.num_tokens


# ----- block pool -----------------------------------------------------------------------------


def test_pool_refcounts_and_double_free() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert (a.ref_count, b.ref_count) == (1, 1)
    assert pool.num_free_blocks == 2 and pool.num_used_blocks == 2
    pool.cache([(a, b"h-a")])
    pool.touch([a])
    assert a.ref_count == 2
    pool.release([a, b])
    assert a.ref_count == 1 and pool.num_free_blocks == 3
    pool.release([a])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="double free"):
        pool.release([a])
    with pytest.raises(ValueError):
        pool.allocate(5)


def test_pool_prefers_uncached_blocks_then_evicts_cached_lru() -> None:
    evicted: list[int] = []
    pool = BlockPool(4, on_evict=lambda blocks: evicted.extend(b.block_id for b in blocks))
    blocks = pool.allocate(4)
    pool.cache([(blocks[0], b"h0"), (blocks[1], b"h1"), (blocks[2], b"h2")])
    # Released in this order: h1 is least recently used, then h0, then h2; block 3 uncached.
    pool.release([blocks[1]])
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    pool.release([blocks[3]])
    assert pool.num_free_blocks == 4
    (first,) = pool.allocate(1)
    assert first.block_id == 3 and evicted == []  # a never-cached block goes first
    assert pool.get_cached(b"h1") is blocks[1]  # still matchable at ref count 0
    taken = [pool.allocate(1)[0].block_id for _ in range(2)]
    assert taken == [1, 0] and evicted == [1, 0]
    assert pool.get_cached(b"h1") is None and pool.get_cached(b"h0") is None
    assert pool.get_cached(b"h2") is blocks[2]


def test_blocks_come_in_runs_even_after_traffic_scrambles_the_free_lists() -> None:
    pool = BlockPool(64)
    held = [pool.allocate(4) for _ in range(16)]
    # Released tail first, interleaved: the free list's order is far from id order.
    for blocks in held[1::2] + held[::2]:
        pool.release(reversed(blocks))
    first = pool.allocate(4)
    assert [b.block_id for b in first] == [7, 8, 9, 10]  # a run from the list's head
    # A growing request takes the blocks after its last one while they are free.
    (grown,) = pool.allocate(1, after=10)
    assert grown.block_id == 11
    assert [b.block_id for b in pool.allocate(2, after=11)] == [12, 13]
    # Where a run meets a block in use, it starts over at the list's head (now 6, then 5).
    assert [b.block_id for b in pool.allocate(2, after=6)] == [6, 5]


def test_a_run_takes_a_shared_prefix_block_out_of_turn_only_when_it_is_old() -> None:
    pool = BlockPool(7)
    blocks = pool.allocate(7)
    pool.cache([(b, f"h{b.block_id}".encode()) for b in blocks])

    def release(*ids: int) -> None:
        pool.release([blocks[i] for i in ids])

    def reuse(block_id: int) -> None:  # a prefix match finds it, and its request ends
        pool.touch([blocks[block_id]])
        release(block_id)

    release(6, 5, 2)
    reuse(2)  # a shared prefix, released long ago
    release(0, 1, 3, 4)
    reuse(4)  # a shared prefix, just released
    # Least recently released first: 6, 5, 2, 0, 1, 3, 4.
    (block,) = pool.allocate(1, after=3)
    assert block.block_id == 6 and pool.get_cached(b"h4") is blocks[4]  # 4 kept, 6 evicted
    (block,) = pool.allocate(1, after=1)
    assert block.block_id == 2 and pool.get_cached(b"h5") is blocks[5]  # old prefix: taken
    (block,) = pool.allocate(1, after=2)
    assert block.block_id == 3 and pool.get_cached(b"h0") is blocks[0]  # never reused: taken
    (block,) = pool.allocate(1, after=1)
    assert block.block_id == 5  # block 2 is in use: the run starts over at the LRU's head


def test_touching_a_cached_free_block_protects_it_from_eviction() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache([(a, b"ha"), (b, b"hb")])
    pool.release([a, b])
    pool.touch([pool.get_cached(b"ha")])  # a prefix hit
    (taken,) = pool.allocate(1)
    assert taken is b and pool.get_cached(b"ha") is a
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_duplicate_hash_keeps_first_block() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache([(a, b"same")])
    pool.cache([(b, b"same")])
    assert pool.get_cached(b"same") is a and b.block_hash is None


# ----- hash chain -----------------------------------------------------------------------------


def test_hash_chain_depends_on_every_earlier_block() -> None:
    x = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    y = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8], BS)
    z = extend_block_hashes([], [0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(x) == 2  # the partial third block is not hashed
    assert x == y
    assert z[1] != y[1]  # same tokens in block 1, different block 0
    assert hash_block_tokens(None, [5, 6, 7, 8]) != y[1]
    assert y[1] == hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert prompt_block_hashes([1, 2, 3, 4, 5], BS) == [y[0].hex()]


def test_extend_block_hashes_only_hashes_new_blocks() -> None:
    hashes = extend_block_hashes([], [1, 2, 3, 4], BS)
    first = hashes[0]
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8], BS, max_blocks=1)
    assert hashes == [first]
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(hashes) == 2 and hashes[0] is first


# ----- manager --------------------------------------------------------------------------------


def test_same_prefix_reuses_blocks_and_counts_hit_rate() -> None:
    kv = KVCacheManager(16, BS)
    a = Req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert compute(kv, a) == 0
    b = Req("b", [*range(8), 50, 51, 52])
    assert compute(kv, b) == 8
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    c = Req("c", [99, *range(1, 10)])  # differs in block 0: nothing shared
    assert compute(kv, c) == 0
    stats = kv.stats()
    assert stats.prefix_hit_tokens == 8 and stats.prompt_tokens == 10 + 11 + 10
    assert stats.prefix_hit_rate == pytest.approx(8 / 31)
    assert stats.num_used_blocks == 3 + 1 + 3  # b shares two blocks with a


def test_a_request_grows_its_blocks_in_a_run_after_traffic() -> None:
    kv = KVCacheManager(10, BS, enable_prefix_caching=False)
    reqs = [Req(f"r{i}", list(range(2 * BS))) for i in range(5)]  # two blocks each: full
    for req in reqs:
        compute(kv, req)
    for i in (1, 0, 4, 2, 3):  # the free list now reads 3 2 1 0 9 8 5 4 7 6
        kv.free(reqs[i])
    b = Req("b", list(range(2 * BS)))
    compute(kv, b)
    for _ in range(3 * BS):  # decode: a new block every BS tokens
        assert kv.append(b)
    assert kv.block_ids("b") == [3, 4, 5, 6, 7]


def test_hit_capped_so_last_prompt_token_is_computed() -> None:
    kv = KVCacheManager(8, BS)
    compute(kv, Req("a", list(range(8))))
    kv.free("a")
    match = kv.match_prefix(list(range(8)), max_cached_tokens=7)
    assert match.num_tokens == 4
    assert kv.match_prefix(list(range(8))).num_tokens == 8


def test_free_keeps_cached_blocks_matchable_until_evicted() -> None:
    kv = KVCacheManager(4, BS)
    compute(kv, Req("a", list(range(9))))  # 3 blocks, 2 cached
    kv.free("a")
    stats = kv.stats()
    assert stats.num_used_blocks == 0 and stats.num_cached_blocks == 2
    assert kv.match_prefix(list(range(9))).num_tokens == 8
    # A 4-block request needs every block: both cached ones get evicted.
    compute(kv, Req("b", list(range(100, 116))))
    assert kv.match_prefix(list(range(9))).num_tokens == 0


def test_alloc_fails_cleanly_and_append_adds_block_only_when_full() -> None:
    kv = KVCacheManager(3, BS)
    a = Req("a", list(range(6)))
    assert kv.alloc(a, 6)
    assert len(kv.block_ids("a")) == 2
    assert kv.append(a, 2)  # fills block 2 up to 8 tokens
    assert len(kv.block_ids("a")) == 2
    assert kv.append(a, 1)  # token 9 needs a third block
    assert len(kv.block_ids("a")) == 3
    assert not kv.append(a, 4)  # no fourth block: unchanged
    assert len(kv.block_ids("a")) == 3
    b = Req("b", [1])
    assert not kv.alloc(b, 1)
    assert not kv.holds("b")
    kv.free(a)
    assert kv.stats().num_free_blocks == 3


def test_alloc_does_not_count_its_own_hit_blocks_as_free() -> None:
    kv = KVCacheManager(3, BS)
    compute(kv, Req("a", list(range(8))))
    kv.free("a")  # 2 cached blocks, ref 0, counted as free
    req = Req("b", [*range(8), 1, 2, 3, 4, 5, 6, 7, 8, 9])
    match = kv.match_prefix(req.tokens, max_cached_tokens=len(req.tokens) - 1)
    assert match.num_tokens == 8
    # 17 tokens need 5 blocks: 2 hit + 3 new, but only 1 block is free besides the hit.
    assert not kv.alloc(req, 9, match)
    assert kv.stats().num_used_blocks == 0


def test_pin_by_context_id_survives_pressure() -> None:
    kv = KVCacheManager(4, BS)
    compute(kv, Req("a", list(range(8))))
    kv.free("a")
    assert kv.pin("ctx-1", list(range(9))) == 8
    assert kv.match_id("ctx-1").block_ids == kv.match_prefix(list(range(8))).block_ids
    assert kv.pinned_token_ids("ctx-1") == list(range(8))
    assert kv.match_id("nope") is None
    assert not kv.alloc(Req("b", list(range(100, 112))), 12)  # pinned blocks are not free
    assert kv.alloc(Req("c", list(range(100, 108))), 8)
    kv.free("c")
    assert kv.unpin("ctx-1") and not kv.unpin("ctx-1")
    assert kv.stats().num_used_blocks == 0


def test_prefix_caching_disabled_never_matches() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    compute(kv, Req("a", list(range(8))))
    assert compute(kv, Req("b", list(range(8)))) == 0
    assert kv.stats().num_cached_blocks == 0


# ----- host tier ------------------------------------------------------------------------------


def test_host_tier_round_trip_restores_identical_content() -> None:
    transport = DictTransport(4)
    kv = KVCacheManager(4, BS, num_host_blocks=8, host_transport=transport)
    prompt = list(range(20, 29))  # 2 full blocks + 1
    a = Req("a", prompt)
    compute(kv, a)
    write_kv(transport, kv, a)
    original = [list(transport.device[b]) for b in kv.block_ids("a")[:2]]
    kv.free("a")

    other = Req("x", list(range(200, 216)))  # needs all 4 blocks: evicts a's cached blocks
    compute(kv, other)
    assert kv.has_pending_transfers
    kv.flush_transfers()  # copies before the step that overwrites them
    write_kv(transport, kv, other)
    assert len(kv.host) == 2 + 0  # x's blocks are still referenced, not evicted
    kv.free("x")

    b = Req("b", [*prompt, 5])
    match = kv.match_prefix(b.tokens, max_cached_tokens=len(b.tokens) - 1)
    assert match.num_device_tokens == 0 and match.num_host_tokens == 8
    assert kv.alloc(b, len(b.tokens) - 8, match)
    kv.flush_transfers()
    restored = [transport.device[blk] for blk in kv.block_ids("b")[:2]]
    assert restored == original == [prompt[:4], prompt[4:8]]
    stats = kv.stats()
    assert stats.host_hit_tokens == 8
    # Populated blocks are matchable on the device again.
    assert kv.match_prefix(prompt).num_device_tokens == 8


def test_host_tier_lru_capacity() -> None:
    transport = DictTransport(2)
    kv = KVCacheManager(2, BS, num_host_blocks=2, host_transport=transport)
    for i in range(3):
        req = Req(f"r{i}", [i] * 8)
        compute(kv, req)
        kv.free(req)
        kv.flush_transfers()
    compute(kv, Req("last", [9] * 8))  # evicts r2's blocks; host keeps the 2 newest
    kv.flush_transfers()
    assert len(kv.host) == 2
    assert kv.match_prefix([2] * 8).num_host_tokens == 8  # the newest evicted blocks
    assert kv.match_prefix([1] * 8).num_tokens == 0  # pushed out of the host tier
    assert kv.match_prefix([0] * 8).num_tokens == 0


def test_events_report_stored_and_removed_hashes_per_tier() -> None:
    recorder = KVEventRecorder()
    transport = DictTransport(2)
    kv = KVCacheManager(2, BS, num_host_blocks=4, host_transport=transport, event_listener=recorder)
    a = Req("a", list(range(8)))
    compute(kv, a)
    hashes = set(a.block_hashes)
    assert recorder.held["device"] == hashes
    kv.free(a)
    compute(kv, Req("b", list(range(50, 58))))
    assert recorder.held["device"] == set(extend_block_hashes([], list(range(50, 58)), BS))
    assert recorder.held["host"] == hashes
    kinds = [(e.kind, e.tier) for e in recorder.events]
    assert ("removed", "device") in kinds and ("stored", "host") in kinds
    assert all(len(h) == 32 for e in recorder.events for h in e.hex_hashes)
