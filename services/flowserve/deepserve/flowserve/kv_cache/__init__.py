"""FlowServe's KV cache: the paper's Relational Tensor Cache (block pool, prefix hashing, host tier)."""

from deepserve.flowserve.kv_cache.block_pool import BlockPool, KVBlock
from deepserve.flowserve.kv_cache.events import KVEvent, KVEventListener, KVEventRecorder
from deepserve.flowserve.kv_cache.host_tier import HostEntry, HostTier, HostTransport
from deepserve.flowserve.kv_cache.manager import (
    KVCacheManager,
    KVCacheStats,
    KVRequest,
    PrefixMatch,
)
from deepserve.prefix_hash import (
    BlockHash,
    extend_block_hashes,
    hash_block_tokens,
    prompt_block_hashes,
)

__all__ = [
    "BlockHash",
    "BlockPool",
    "HostEntry",
    "HostTier",
    "HostTransport",
    "KVBlock",
    "KVCacheManager",
    "KVCacheStats",
    "KVEvent",
    "KVEventListener",
    "KVEventRecorder",
    "KVRequest",
    "PrefixMatch",
    "extend_block_hashes",
    "hash_block_tokens",
    "prompt_block_hashes",
]
