"""The etcd store: typed records under /deepserve/, leases with keep-alive, watches, CAS.

Built on `aetcd`. Values are JSON of pydantic models (readable with `etcdctl get`). Every write that
must not overwrite a concurrent writer goes through `create` or `compare_and_swap`, which compare
the key's modification revision inside one etcd transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import aetcd
from pydantic import BaseModel

from deepserve.background import stop_task
from deepserve.errors import Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One stored key with the revisions needed for compare-and-swap."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease_id: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched prefix; `value` is empty for deletes."""

    kind: str  # "put" or "delete"
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class CasWrite:
    """One key of a `compare_and_swap_many`: written only if its revision is still this."""

    key: str
    value: bytes
    expected_mod_revision: int
    lease_id: int | None = None


def _kv(raw: object) -> KeyValue:
    return KeyValue(
        key=raw.key.decode(),  # type: ignore[attr-defined]
        value=raw.value,  # type: ignore[attr-defined]
        mod_revision=raw.mod_revision,  # type: ignore[attr-defined]
        create_revision=raw.create_revision,  # type: ignore[attr-defined]
        lease_id=raw.lease,  # type: ignore[attr-defined]
    )


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    return host or "127.0.0.1", int(port)


class EtcdStore:
    """Async access to etcd for one process; `connect()` once, share the instance."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        host, port = parse_endpoint(endpoint)
        self._client = aetcd.Client(host=host, port=port, timeout=timeout_s)

    async def connect(self, wait_s: float = 10.0) -> None:
        """Connects and checks etcd answers, retrying until `wait_s` passes."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                await self._client.connect()
                await self._client.status()
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise Unavailable(f"etcd at {self.endpoint} is unreachable: {exc}") from exc
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        result = await self._client.get(key.encode())
        return _kv(result) if result is not None else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under `prefix` and the store revision they were read at."""
        result = await self._client.get_prefix(prefix.encode())
        return [_kv(raw) for raw in result.kvs], result.header.revision

    # --- writes ----------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        result = await self._client.put(key.encode(), value, lease=lease_id)
        return result.header.revision

    async def create(self, key: str, value: bytes, *, lease_id: int | None = None) -> int:
        """Writes `key` only if it does not exist; returns the new revision or raises Conflict."""
        txn = self._client.transactions
        ok, responses = await self._client.transaction(
            compare=[txn.create(key.encode()) == 0],
            success=[txn.put(key.encode(), value, lease=lease_id)],
            failure=[],
        )
        if not ok:
            raise Conflict(f"{key} already exists")
        return responses[0].response_put.header.revision

    async def compare_and_swap(
        self,
        key: str,
        value: bytes,
        *,
        expected_mod_revision: int,
        lease_id: int | None = None,
    ) -> int:
        """Writes `key` only if nobody changed it since `expected_mod_revision`."""
        txn = self._client.transactions
        ok, responses = await self._client.transaction(
            compare=[txn.mod(key.encode()) == expected_mod_revision],
            success=[txn.put(key.encode(), value, lease=lease_id)],
            failure=[],
        )
        if not ok:
            raise Conflict(f"{key} changed since revision {expected_mod_revision}")
        return responses[0].response_put.header.revision

    async def compare_and_swap_many(self, writes: Sequence[CasWrite]) -> int:
        """All or nothing, in one transaction: writes every key only if none of them changed
        since its expected revision; returns the new revision or raises Conflict. etcd bounds
        a transaction's operations (`--max-txn-ops`, 128 by default)."""
        if not writes:
            raise ValueError("no writes")
        txn = self._client.transactions
        ok, responses = await self._client.transaction(
            compare=[txn.mod(w.key.encode()) == w.expected_mod_revision for w in writes],
            success=[txn.put(w.key.encode(), w.value, lease=w.lease_id) for w in writes],
            failure=[],
        )
        if not ok:
            raise Conflict(f"one of {len(writes)} keys changed since it was read")
        return responses[0].response_put.header.revision

    async def delete(self, key: str, *, expected_mod_revision: int | None = None) -> bool:
        """Deletes `key`; with `expected_mod_revision`, only if unchanged (else Conflict)."""
        if expected_mod_revision is None:
            return bool(await self._client.delete(key.encode()))
        txn = self._client.transactions
        ok, _ = await self._client.transaction(
            compare=[txn.mod(key.encode()) == expected_mod_revision],
            success=[txn.delete(key.encode())],
            failure=[],
        )
        if not ok:
            raise Conflict(f"{key} changed since revision {expected_mod_revision}")
        return True

    async def delete_prefix(self, prefix: str) -> int:
        return (await self._client.delete_prefix(prefix.encode())).deleted

    # --- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> KeepAliveLease:
        """A lease kept alive in the background until `revoke()` (or the process dies)."""
        lease = await self._client.lease(ttl_s)
        keeper = KeepAliveLease(self._client, lease.id, ttl_s)
        keeper.start()
        return keeper

    async def revoke_lease(self, lease_id: int) -> bool:
        """Deletes a lease and every key attached to it; False when etcd no longer has it."""
        try:
            await self._client.revoke_lease(lease_id)
        except aetcd.exceptions.ClientError as exc:
            if "lease not found" in str(exc):
                return False
            raise
        return True

    async def grant_expiring_lease(self, ttl_s: int) -> int:
        """A lease nobody keeps alive: etcd deletes the keys attached to it after `ttl_s`,
        whoever is running then (records with an expiry of their own)."""
        lease = await self._client.lease(max(1, int(ttl_s)))
        return int(lease.id)

    # --- watches ---------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, *, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix` from `start_revision` on, resuming after stream errors.

        Callers list first, then watch from the list's revision + 1, so no change is missed
        (the list-then-watch pattern of Kubernetes informers).
        """
        next_revision = start_revision
        while True:
            watch = None
            try:
                watch = await self._client.watch_prefix(
                    prefix.encode(), start_revision=next_revision
                )
                async for event in watch:
                    kv = event.kv
                    next_revision = kv.mod_revision + 1
                    yield WatchEvent(
                        kind="put" if event.kind == "PUT" else "delete",
                        key=kv.key.decode(),
                        value=kv.value,
                        mod_revision=kv.mod_revision,
                    )
            except aetcd.RevisionCompactedError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # stream broke: etcd restarted or the network blipped
                log.warning("etcd watch on %s broke (%s); resuming", prefix, exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._client.close()
                    await self._client.connect()
            finally:
                # Closing the iterator early (break, cancel) must also end the server-side watch.
                if watch is not None:
                    # Bounded: aetcd's cancel waits on its request stream, which can be stuck.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), 2.0)


class KeepAliveLease:
    """A granted lease plus the task that refreshes it at a third of its TTL.

    If refreshing fails for longer than the TTL the lease is gone on the server; `lost` is set
    so the owner can re-register (or exit) instead of believing it is still visible.
    """

    def __init__(self, client: aetcd.Client, lease_id: int, ttl_s: int) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self._client = client
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        self._on_lost: list[Callable[[], None]] = []

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._on_lost.append(callback)

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_alive(), name=f"lease-{self.id:x}")

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(max(self.ttl_s / 3, 0.2))
            try:
                # Bounded: across a cut link the call would hang, never fail, and the lease
                # would never count as lost.
                reply = await asyncio.wait_for(
                    self._client.refresh_lease(self.id), timeout=max(self.ttl_s / 2, 0.5)
                )
                if reply is not None and reply.TTL <= 0:
                    break  # the server no longer knows this lease
                last_ok = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease %x refresh failed: %s", self.id, exc)
                if loop.time() - last_ok > self.ttl_s:
                    break
        self.lost.set()
        for callback in self._on_lost:
            callback()

    async def revoke(self) -> None:
        """Stops refreshing and deletes the lease with every key attached to it."""
        # The refresh loop awaits wait_for, which can swallow one cancel (see background.py).
        await stop_task(self._task)
        # Bounded: a process cut off from etcd still exits (its lease expires there anyway).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.revoke_lease(self.id), timeout=self.ttl_s)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[ModelT]):
    """A decoded record and the revision to compare against when writing it back."""

    key: str
    record: ModelT
    mod_revision: int
    lease_id: int = 0


class TypedPrefix(Generic[ModelT]):
    """The records of one pydantic type under one key prefix."""

    def __init__(
        self,
        store: EtcdStore,
        prefix: str,
        model: type[ModelT],
        key_of: Callable[[str], str],
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.model = model
        self._key_of = key_of

    def key(self, name: str) -> str:
        return self._key_of(name)

    def decode(self, value: bytes) -> ModelT:
        return self.model.model_validate_json(value)

    @staticmethod
    def encode(record: BaseModel) -> bytes:
        return record.model_dump_json().encode()

    async def get(self, name: str) -> Versioned[ModelT] | None:
        kv = await self.store.get(self.key(name))
        return (
            Versioned(kv.key, self.decode(kv.value), kv.mod_revision, kv.lease_id) if kv else None
        )

    async def require(self, name: str) -> Versioned[ModelT]:
        found = await self.get(name)
        if found is None:
            raise NotFound(
                f"{self.model.__name__.removesuffix('Record').lower()} {name!r} not found"
            )
        return found

    async def list(self) -> tuple[list[Versioned[ModelT]], int]:
        kvs, revision = await self.store.list(self.prefix)
        return [
            Versioned(kv.key, self.decode(kv.value), kv.mod_revision, kv.lease_id) for kv in kvs
        ], revision

    async def put(self, name: str, record: ModelT, *, lease_id: int | None = None) -> int:
        return await self.store.put(self.key(name), self.encode(record), lease_id=lease_id)

    async def create(self, name: str, record: ModelT, *, lease_id: int | None = None) -> int:
        return await self.store.create(self.key(name), self.encode(record), lease_id=lease_id)

    async def compare_and_swap(
        self,
        name: str,
        record: ModelT,
        expected_mod_revision: int,
        *,
        lease_id: int | None = None,
    ) -> int:
        return await self.store.compare_and_swap(
            self.key(name),
            self.encode(record),
            expected_mod_revision=expected_mod_revision,
            lease_id=lease_id,
        )

    async def compare_and_swap_many(
        self, writes: Sequence[tuple[str, ModelT, int, int | None]]
    ) -> int:
        """(name, record, expected revision, lease) for each; all written or none (Conflict)."""
        return await self.store.compare_and_swap_many(
            [
                CasWrite(self.key(name), self.encode(rec), rev, lease)
                for name, rec, rev, lease in writes
            ]
        )

    async def update(
        self,
        name: str,
        mutate: Callable[[ModelT], ModelT | None],
        *,
        attempts: int = 64,
    ) -> Versioned[ModelT]:
        """Read-modify-write with CAS, retried when a concurrent writer got in between.

        `mutate` gets the current record (a copy) and returns the new one, or None to leave it.
        A leased record keeps its lease.
        """
        for attempt in range(attempts):
            current = await self.require(name)
            updated = mutate(current.record.model_copy(deep=True))
            if updated is None:
                return current
            try:
                revision = await self.compare_and_swap(
                    name,
                    updated,
                    current.mod_revision,
                    lease_id=current.lease_id or None,
                )
            except Conflict:
                # Each round exactly one contender wins; jitter spreads the others out.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                continue
            return Versioned(current.key, updated, revision, current.lease_id)
        raise Conflict(f"{name}: too many concurrent writers")

    async def delete(self, name: str, *, expected_mod_revision: int | None = None) -> bool:
        return await self.store.delete(self.key(name), expected_mod_revision=expected_mod_revision)
