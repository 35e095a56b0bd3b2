"""Physical KV blocks: reference counts, a free list, and the hash -> cached block map."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from deepserve.flowserve.kv_cache.events import KVEvent, KVEventListener
from deepserve.prefix_hash import BlockHash


class KVBlock:
    """One physical block of KV slots; block_id indexes the executor's [num_blocks, ...] tensors."""

    __slots__ = ("block_hash", "block_id", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set while the block is registered in the prefix cache (full and its KV final).
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Hands out blocks, counts references, and evicts unreferenced cached blocks LRU-first.

    A block whose reference count drops to zero keeps its hash and stays matchable until a
    free block is needed and no never-cached block is left; then the least recently released
    cached block is evicted (reported through `on_evict` first, so a host tier can save it).
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
        self._uncached_free: deque[KVBlock] = deque(self.blocks)
        # Unreferenced cached blocks, least recently released first.
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
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

    def allocate(self, num: int) -> list[KVBlock]:
        """Take `num` blocks (each with ref count 1), evicting cached ones only when needed."""
        if num > self.num_free_blocks:
            raise ValueError(f"asked for {num} blocks, {self.num_free_blocks} free")
        taken: list[KVBlock] = []
        evicted: list[KVBlock] = []
        while len(taken) < num and self._uncached_free:
            taken.append(self._uncached_free.popleft())
        while len(taken) < num:
            _, block = self._evictable.popitem(last=False)
            evicted.append(block)
            taken.append(block)
        if evicted:
            if self._on_evict is not None:
                self._on_evict(evicted)
            hashes = []
            for block in evicted:
                assert block.block_hash is not None
                del self._cached[block.block_hash]
                hashes.append(block.block_hash)
                block.block_hash = None
            self._emit(KVEvent("removed", "device", tuple(hashes)))
        for block in taken:
            block.ref_count = 1
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (a prefix hit), taking unreferenced ones off the LRU."""
        for block in blocks:
            if block.ref_count == 0:
                # Only cached blocks can be found again after release.
                assert block.block_hash is not None, "touching a free uncached block"
                del self._evictable[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero become free (cached ones LRU)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._evictable[block.block_id] = block
                else:
                    self._uncached_free.append(block)

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
