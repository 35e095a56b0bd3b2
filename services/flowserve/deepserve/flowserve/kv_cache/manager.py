"""The Relational Tensor Cache: per-request block tables over a shared, prefix-reusable pool.

Public operations follow the paper's RTC: match by prefix tokens, match by explicit ID,
alloc (prefill), append (decode), free, copy (device -> host) and populate (host -> device).
Device <-> host copies are queued and run by `flush_transfers()`, which the engine calls at the
one moment it is safe: after the in-flight forward step finished and before the next one is
submitted (an evicted block may still be written by the step in flight, and a reused one is
written by the next step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from deepserve.flowserve.kv_cache.block_pool import BlockPool, KVBlock
from deepserve.flowserve.kv_cache.events import KVEventListener
from deepserve.flowserve.kv_cache.host_tier import HostEntry, HostTier, HostTransport
from deepserve.prefix_hash import BlockHash, extend_block_hashes


class KVRequest(Protocol):
    """What the cache needs to know of a request (deepserve.flowserve.engine.request.Request fits)."""

    request_id: str
    # Chain hashes of the request's full blocks of known tokens; filled lazily by the cache.
    block_hashes: list[BlockHash]
    # Seeds the hash chain (tenant isolation); "" is the unsalted chain.
    cache_salt: str

    @property
    def all_token_ids(self) -> Sequence[int]: ...


@dataclass(slots=True)
class PrefixMatch:
    """Cached blocks covering a prompt's leading tokens: device-resident, then host-resident."""

    block_size: int
    blocks: list[KVBlock] = field(default_factory=list)
    host_entries: list[HostEntry] = field(default_factory=list)

    @property
    def num_device_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def num_host_tokens(self) -> int:
        return len(self.host_entries) * self.block_size

    @property
    def num_tokens(self) -> int:
        return self.num_device_tokens + self.num_host_tokens

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """Point-in-time occupancy and prefix-reuse counters of the cache."""

    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_host_blocks: int
    num_host_blocks_used: int
    prompt_tokens: int
    prefix_hit_tokens: int
    host_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class _Pinned:
    blocks: list[KVBlock]
    token_ids: list[int]
    # Unix time the pin lapses (0: never); `unpin_expired` honours it.
    expires_at: float = 0.0


@dataclass(frozen=True, slots=True)
class PinnedContext:
    """A context id held pinned: how many tokens, and until when."""

    context_id: str
    num_tokens: int
    expires_at: float


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates KV blocks to requests, reuses cached prefixes and moves blocks between tiers."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
        host_transport: HostTransport | None = None,
        event_listener: KVEventListener | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, on_evict=self._on_evict, event_listener=event_listener)
        use_host = enable_prefix_caching and num_host_blocks > 0 and host_transport is not None
        self.host = HostTier(num_host_blocks if use_host else 0, event_listener=event_listener)
        self._transport = host_transport
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # Token slots allocated per request (what its blocks can hold so far).
        self._req_num_tokens: dict[str, int] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._req_num_cached_blocks: dict[str, int] = {}
        self._pinned: dict[str, _Pinned] = {}
        self._pending_to_host: list[tuple[int, HostEntry]] = []
        self._pending_from_host: list[tuple[int, HostEntry]] = []
        self._prompt_tokens = 0
        self._hit_tokens = 0
        self._host_hit_tokens = 0

    # ----- RTC: match -------------------------------------------------------------------------

    def match_prefix(
        self,
        token_ids: Sequence[int],
        *,
        block_hashes: list[BlockHash] | None = None,
        max_cached_tokens: int | None = None,
        salt: str = "",
    ) -> PrefixMatch:
        """Longest run of leading full blocks already cached, on the device and then on the host.

        Read-only: nothing is referenced until `alloc` takes the match. `max_cached_tokens`
        caps the hit (the step planner passes len-1: the last prompt token must be computed to get
        logits). `block_hashes`, when given, is the caller's hash cache and is extended in place.
        """
        match = PrefixMatch(self.block_size)
        if not self.enable_prefix_caching:
            return match
        limit = (
            len(token_ids) if max_cached_tokens is None else min(len(token_ids), max_cached_tokens)
        )
        max_blocks = max(limit, 0) // self.block_size
        hashes = block_hashes if block_hashes is not None else []
        extend_block_hashes(hashes, token_ids, self.block_size, max_blocks=max_blocks, salt=salt)
        for block_hash in hashes[:max_blocks]:
            if not match.host_entries:
                block = self.pool.get_cached(block_hash)
                if block is not None:
                    match.blocks.append(block)
                    continue
            entry = self.host.lookup(block_hash)
            if entry is None:
                break
            match.host_entries.append(entry)
        return match

    def match_id(self, context_id: str) -> PrefixMatch | None:
        """The blocks pinned under an explicit context id, or None when the id is unknown."""
        pinned = self._pinned.get(context_id)
        if pinned is None:
            return None
        return PrefixMatch(self.block_size, blocks=list(pinned.blocks))

    def pinned_token_ids(self, context_id: str) -> list[int] | None:
        pinned = self._pinned.get(context_id)
        return list(pinned.token_ids) if pinned is not None else None

    def pin(
        self,
        context_id: str,
        token_ids: Sequence[int],
        *,
        salt: str = "",
        expires_at: float = 0.0,
    ) -> int:
        """Hold the device-cached prefix of `token_ids` under `context_id` so it is never evicted.

        Returns the number of tokens pinned (whole blocks only). Pinning an id again replaces
        the old pin.
        """
        match = self.match_prefix(token_ids, salt=salt)
        self.pool.touch(match.blocks)
        self.unpin(context_id)
        self._pinned[context_id] = _Pinned(
            match.blocks, list(token_ids[: match.num_device_tokens]), expires_at
        )
        return match.num_device_tokens

    def pinned(self) -> list[PinnedContext]:
        """Every pinned context, by id."""
        return [
            PinnedContext(context_id, len(p.token_ids), p.expires_at)
            for context_id, p in sorted(self._pinned.items())
        ]

    def unpin_expired(self, now: float) -> list[str]:
        """Unpin every context whose expiry has passed; returns their ids."""
        expired = [cid for cid, p in self._pinned.items() if 0 < p.expires_at <= now]
        for context_id in expired:
            self.unpin(context_id)
        return expired

    def unpin(self, context_id: str) -> bool:
        pinned = self._pinned.pop(context_id, None)
        if pinned is None:
            return False
        self.pool.release(reversed(pinned.blocks))
        return True

    # ----- RTC: alloc / append / free ---------------------------------------------------------

    def alloc(
        self, request: KVRequest, num_new_tokens: int, match: PrefixMatch | None = None
    ) -> bool:
        """Give a request entering prefill its cached prefix plus blocks for `num_new_tokens`.

        Host-resident hits get fresh device blocks that are populated at the next flush.
        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        if request.request_id in self._req_blocks:
            raise ValueError(f"request {request.request_id} already holds blocks")
        match = match if match is not None else PrefixMatch(self.block_size)
        num_tokens = match.num_tokens + num_new_tokens
        num_new_blocks = _cdiv(num_tokens, self.block_size) - len(match.blocks)
        # Unreferenced hit blocks sit in the free count but are not available to take.
        reusable = sum(1 for b in match.blocks if b.ref_count == 0)
        if num_new_blocks > self.pool.num_free_blocks - reusable:
            return False
        self.pool.touch(match.blocks)
        last = match.blocks[-1].block_id if match.blocks else None
        new_blocks = self.pool.allocate(num_new_blocks, after=last)
        self.populate(new_blocks[: len(match.host_entries)], match.host_entries)
        self._req_blocks[request.request_id] = match.blocks + new_blocks
        self._req_num_tokens[request.request_id] = num_tokens
        self._req_num_cached_blocks[request.request_id] = len(match.blocks) + len(
            match.host_entries
        )
        self._prompt_tokens += len(request.all_token_ids)
        self._hit_tokens += match.num_tokens
        self._host_hit_tokens += match.num_host_tokens
        return True

    def append(self, request: KVRequest, num_new_tokens: int = 1) -> bool:
        """Make room for `num_new_tokens` more tokens (a decode token or the next prompt chunk).

        A new block is taken only when the last one is full. Returns False, changing nothing,
        when no block is free.
        """
        blocks = self._req_blocks[request.request_id]
        num_tokens = self._req_num_tokens[request.request_id] + num_new_tokens
        needed = _cdiv(num_tokens, self.block_size) - len(blocks)
        if needed > self.pool.num_free_blocks:
            return False
        if needed > 0:
            blocks.extend(self.pool.allocate(needed, after=blocks[-1].block_id if blocks else None))
        self._req_num_tokens[request.request_id] = num_tokens
        return True

    def free(self, request: KVRequest | str) -> None:
        """Release a finished or preempted request's blocks; its cached full blocks stay matchable."""
        request_id = request if isinstance(request, str) else request.request_id
        blocks = self._req_blocks.pop(request_id, None)
        self._req_num_tokens.pop(request_id, None)
        self._req_num_cached_blocks.pop(request_id, None)
        if blocks:
            # Tail blocks first, so they are evicted before the (more shareable) prefix.
            self.pool.release(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def holds(self, request_id: str) -> bool:
        return request_id in self._req_blocks

    def cache_blocks(self, request: KVRequest, num_computed_tokens: int) -> None:
        """Register the request's full blocks whose KV is computed (or being computed) as reusable.

        Only blocks of known tokens qualify: with asynchronous scheduling the newest token of a
        running sequence is not known when its slot is scheduled.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks.get(request.request_id)
        if blocks is None:
            return
        token_ids = request.all_token_ids
        num_full = min(num_computed_tokens, len(token_ids)) // self.block_size
        start = self._req_num_cached_blocks[request.request_id]
        if num_full <= start:
            return
        hashes = extend_block_hashes(
            request.block_hashes,
            token_ids,
            self.block_size,
            max_blocks=num_full,
            salt=request.cache_salt,
        )
        self.pool.cache(zip(blocks[start:num_full], hashes[start:num_full], strict=True))
        self._req_num_cached_blocks[request.request_id] = num_full

    # ----- RTC: copy / populate (host tier) ---------------------------------------------------

    def copy_to_host(self, block_ids: Sequence[int]) -> int:
        """Queue a copy of cached device blocks to host DRAM; returns how many were queued."""
        blocks = [self.pool.blocks[i] for i in block_ids]
        return self._queue_to_host([b for b in blocks if b.block_hash is not None])

    def populate(self, blocks: Sequence[KVBlock], entries: Sequence[HostEntry]) -> None:
        """Queue loading host entries into device blocks and make those blocks matchable."""
        for block, entry in zip(blocks, entries, strict=True):
            self._pending_from_host.append((block.block_id, entry))
        self.pool.cache((b, e.block_hash) for b, e in zip(blocks, entries, strict=True))

    @property
    def has_pending_transfers(self) -> bool:
        """The RTC 'query populate': whether copies are queued and not yet run."""
        return bool(self._pending_to_host or self._pending_from_host)

    def flush_transfers(self) -> None:
        """Run the queued device->host copies, then the host->device loads, through the executor."""
        if self._transport is None:
            self._pending_to_host.clear()
            self._pending_from_host.clear()
            return
        to_host, self._pending_to_host = self._pending_to_host, []
        if to_host:
            payloads = self._transport.copy_to_host([block_id for block_id, _ in to_host])
            for (_, entry), payload in zip(to_host, payloads, strict=True):
                entry.payload = payload
        from_host, self._pending_from_host = self._pending_from_host, []
        if from_host:
            self._transport.load_from_host(
                [block_id for block_id, _ in from_host], [entry.payload for _, entry in from_host]
            )

    def _on_evict(self, blocks: list[KVBlock]) -> None:
        self._queue_to_host(blocks)

    def _queue_to_host(self, blocks: Sequence[KVBlock]) -> int:
        if self.host.capacity_blocks == 0 or not blocks:
            return 0
        by_hash = {b.block_hash: b for b in blocks if b.block_hash is not None}
        entries = self.host.reserve(list(by_hash))
        for entry in entries:
            self._pending_to_host.append((by_hash[entry.block_hash].block_id, entry))
        return len(entries)

    # ----- counters ---------------------------------------------------------------------------

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_free_blocks=self.pool.num_free_blocks,
            num_cached_blocks=self.pool.num_cached_blocks,
            num_host_blocks=self.host.capacity_blocks,
            num_host_blocks_used=len(self.host),
            prompt_tokens=self._prompt_tokens,
            prefix_hit_tokens=self._hit_tokens,
            host_hit_tokens=self._host_hit_tokens,
        )
