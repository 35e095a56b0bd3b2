"""API keys: shown to their owner once, stored in etcd only as a SHA-256 hash.

A key is `ds-` plus 32 random bytes (base64url). Its record lives under
/deepserve/apikeys/<sha256 hex> and names the tenant; the short `key_id` (the hash's first 12
hex digits) identifies it in listings and for revocation without revealing anything of the key.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from pydantic import BaseModel, Field

from deepserve.errors import InvalidArgument, NotFound
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.keys import Keys

API_KEYS_PREFIX = Keys.api_keys_prefix()
KEY_PREFIX = "ds-"
KEY_ID_LENGTH = 12


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeyRecord(BaseModel):
    """One API key: its hash, the tenant it belongs to, and a label."""

    key_hash: str
    tenant: str
    name: str = ""
    created_at: float = Field(default_factory=time.time)

    @property
    def key_id(self) -> str:
        return self.key_hash[:KEY_ID_LENGTH]


class ApiKeys:
    """Creates, lists and revokes API keys."""

    def __init__(self, store: EtcdStore) -> None:
        self.records: TypedPrefix[ApiKeyRecord] = TypedPrefix(
            store, API_KEYS_PREFIX, ApiKeyRecord, Keys.api_key
        )

    async def create(self, tenant: str, name: str = "") -> tuple[str, ApiKeyRecord]:
        """A new key for `tenant`; returns the plaintext (never stored) and its record."""
        if not tenant:
            raise InvalidArgument("a tenant name is required", field="tenant")
        key = new_api_key()
        record = ApiKeyRecord(key_hash=hash_api_key(key), tenant=tenant, name=name)
        await self.records.create(record.key_hash, record)
        return key, record

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        found = await self.records.get(hash_api_key(key))
        return found.record if found is not None else None

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        found, _ = await self.records.list()
        keys = [v.record for v in found]
        return [k for k in keys if tenant is None or k.tenant == tenant]

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        """Deletes the key whose id (or full hash) starts with `key_id`; it must be unambiguous."""
        if len(key_id) < 6:
            raise InvalidArgument("give at least 6 characters of the key id", field="key_id")
        matches = [k for k in await self.list() if k.key_hash.startswith(key_id)]
        if not matches:
            raise NotFound(f"no API key with id {key_id!r}", field="key_id")
        if len(matches) > 1:
            raise InvalidArgument(f"key id {key_id!r} is ambiguous", field="key_id")
        await self.records.delete(matches[0].key_hash)
        return matches[0]
