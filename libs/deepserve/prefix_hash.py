"""Hash chain over full KV blocks: the key under which a block's KV can be reused.

A block's hash covers its own token ids *and* its parent's hash, so two blocks with the same
tokens but different earlier context never collide. The function is pure Python and stable
across processes (no PYTHONHASHSEED dependence) because the global scheduler recomputes the
same chain from a prompt to find which instance holds the longest cached prefix.

A cache salt seeds the chain (like vLLM's `cache_salt`): the first block's parent is a digest
of the salt, so the same tokens under different salts hash apart at every block. The gateway
salts each prompt with its tenant, so a tenant never hits a prefix another tenant cached,
unless requests share an explicit salt on purpose. The empty salt is the unsalted chain.

A LoRA adapter changes every layer's KV, so the adapter's id is mixed into the salt too
(`adapter_salt`): the engine's cache keys and the router's hashes both use it, and no block
computed under one adapter (or the base model) is ever a hit for another.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes

_DIGEST_BYTES = 16


def adapter_salt(salt: str, adapter: str) -> str:
    """The cache salt of a request served with `adapter` ("" for the base model)."""
    if not adapter:
        return salt
    return f"{salt}\x00lora:{adapter}"


def salt_root(salt: str) -> BlockHash | None:
    """The parent the first block hashes under: None (all zeros) without a salt."""
    if not salt:
        return None
    return hashlib.blake2b(
        b"deepserve-cache-salt\x00" + salt.encode(), digest_size=_DIGEST_BYTES
    ).digest()


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(parent if parent is not None else b"\x00" * _DIGEST_BYTES)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def extend_block_hashes(
    hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    *,
    max_blocks: int | None = None,
    salt: str = "",
) -> list[BlockHash]:
    """Append to `hashes` the chain hashes of every further full block of `token_ids`.

    `hashes` is a cache held by the caller (e.g. one per request): only blocks not hashed yet
    are hashed, so calling this after every decode step costs one hash per new full block.
    """
    num_full = len(token_ids) // block_size
    if max_blocks is not None:
        num_full = min(num_full, max_blocks)
    parent = hashes[-1] if hashes else salt_root(salt)
    for i in range(len(hashes), num_full):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, salt: str = "") -> list[str]:
    """Hex hash chain of a prompt's full blocks, as carried in RouteRequest.prefix_block_hashes."""
    return [h.hex() for h in extend_block_hashes([], token_ids, block_size, salt=salt)]
