"""Physical KV blocks: reference counts, a free list, and the hash -> cached block map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from deepserve.flowserve.kv_cache.events import KVEvent, KVEventListener
from deepserve.prefix_hash import BlockHash


class KVBlock:
    """One physical block of KV slots; block_id indexes the executor's [num_blocks, ...] tensors."""

    __slots__ = ("block_hash", "block_id", "ref_count", "released_at", "reused")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set while the block is registered in the prefix cache (full and its KV final).
        self.block_hash: BlockHash | None = None
        # When its last reference went (the pool's release count then).
        self.released_at = 0
        # Found again by a prefix match since it was cached (a shared prefix, likely to be again).
        self.reused = False

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Hands out blocks, counts references, and evicts unreferenced cached blocks LRU-first.

    A block whose reference count drops to zero keeps its hash and stays matchable until it is
    taken: when a free block is needed and no never-cached block is left, the least recently
    released cached block is evicted, or earlier to extend a run (below). Evictions are
    reported through `on_evict` first, so a host tier can save the blocks.

    Allocation lays each request's blocks out in runs of adjacent ids, because decode attention
    reads a sequence's blocks in order and reads runs faster than scattered blocks: 32 sequences
    of 272 tokens, float32, took 26-28 ms in runs against 28-31 ms as the free lists alone left
    them, which after a round of traffic had almost no two neighbours adjacent (bench/RESULTS.md,
    issue #19). A run starts at the block the lists give (never-cached first, then the LRU's
    head) and goes on to the next id while that block is free and may be taken before its turn:
    never cached, cached but never reused by a prefix match (LRU order guards hits, and these
    have had none), or reused but released in the older half of the evictable span. A growing
    request's run goes on from its last block.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        on_evict: Callable[[list[KVBlock]], None] | None = None,
        event_listener: KVEventListener | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Never-cached free blocks, in release order; both maps are keyed by block id.
        self._uncached_free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        # Unreferenced cached blocks, least recently released first.
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        self._num_releases = 0
        self._cached: dict[BlockHash, KVBlock] = {}
        self._on_evict = on_evict
        self._listener = event_listener

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation may take now (never-cached plus evictable cached ones)."""
        return len(self._uncached_free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_cached(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, num: int, after: int | None = None) -> list[KVBlock]:
        """Take `num` blocks (each with ref count 1), evicting cached ones only when needed, in
        runs (class docstring); the first run goes on from block `after` (the request's last)."""
        if num > self.num_free_blocks:
            raise ValueError(f"asked for {num} blocks, {self.num_free_blocks} free")
        taken: list[KVBlock] = []
        evicted: list[KVBlock] = []
        next_id = self.num_blocks if after is None else after + 1
        while len(taken) < num:
            block = self.blocks[next_id] if next_id < self.num_blocks else None
            if block is not None and self._takes_out_of_turn(block):
                if self._uncached_free.pop(block.block_id, None) is None:
                    del self._evictable[block.block_id]
                    evicted.append(block)
            elif self._uncached_free:
                block = self._uncached_free.popitem(last=False)[1]
            else:
                block = self._evictable.popitem(last=False)[1]
                evicted.append(block)
            taken.append(block)
            next_id = block.block_id + 1
        if evicted:
            if self._on_evict is not None:
                self._on_evict(evicted)
            hashes = []
            for block in evicted:
                assert block.block_hash is not None
                del self._cached[block.block_hash]
                hashes.append(block.block_hash)
                block.block_hash = None
                block.reused = False
            self._emit(KVEvent("removed", "device", tuple(hashes)))
        for block in taken:
            block.ref_count = 1
        return taken

    def _takes_out_of_turn(self, block: KVBlock) -> bool:
        """Whether a free block may be taken before its turn, to extend a run: a never-cached
        one, a cached one no prefix match has reused, or a reused one released in the older
        half of the evictable blocks' span (a shared prefix is not evicted early)."""
        if block.ref_count:
            return False
        if block.block_id in self._uncached_free:
            return True
        if block.block_id not in self._evictable:
            return False
        if not block.reused:
            return True
        oldest = next(iter(self._evictable.values())).released_at
        return block.released_at - oldest <= (self._num_releases - oldest) // 2

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (a prefix hit), taking unreferenced ones off the LRU."""
        for block in blocks:
            if block.ref_count == 0:
                # Only cached blocks can be found again after release.
                assert block.block_hash is not None, "touching a free uncached block"
                del self._evictable[block.block_id]
            block.ref_count += 1
            block.reused = True

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero become free (cached ones LRU)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._num_releases += 1
                block.released_at = self._num_releases
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._uncached_free[block.block_id] = block

    def cache(self, blocks_and_hashes: Iterable[tuple[KVBlock, BlockHash]]) -> None:
        """Register full blocks under their chain hashes so later prompts can reuse them.

        A hash already held by another block (two requests computed the same prefix at once)
        keeps the first block; the duplicate stays uncached and is recycled when released.
        """
        stored = []
        for block, block_hash in blocks_and_hashes:
            if block.block_hash is not None or block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block
            stored.append(block_hash)
        if stored:
            self._emit(KVEvent("stored", "device", tuple(stored)))

    def _emit(self, event: KVEvent) -> None:
        if self._listener is not None:
            self._listener(event)
