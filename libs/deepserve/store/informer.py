"""An in-memory mirror of one etcd prefix, kept current by a watch (pushed, never polled).

List once, then watch from the list's revision + 1; on compaction, list again. Handlers see
every add, update and delete, so consumers (the scheduler's instance table, the gateway's model
list, podpool's pod view) react the moment etcd changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic

import aetcd

from deepserve.store.etcd import EtcdStore, ModelT, TypedPrefix
from deepserve.store.keys import last_segment

log = logging.getLogger(__name__)

Handler = Callable[[str, str, "ModelT | None"], None]  # (kind, name, record) kind: put|delete


class Informer(Generic[ModelT]):
    """Mirrors `TypedPrefix` records by name; `ready` is set after the first full list."""

    def __init__(self, records: TypedPrefix[ModelT]) -> None:
        self._records = records
        self.items: dict[str, ModelT] = {}
        self.ready = asyncio.Event()
        self._handlers: list[Callable[[str, str, ModelT | None], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    @property
    def store(self) -> EtcdStore:
        return self._records.store

    def add_handler(self, handler: Callable[[str, str, ModelT | None], None]) -> None:
        self._handlers.append(handler)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer:{self._records.prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a cancelled etcd watch can stay stuck inside aetcd's watcher (seen as
            # an occasional hang on shutdown); the task is abandoned rather than waited on.
            await asyncio.wait({self._task}, timeout=5.0)
            if self._task.done() and not self._task.cancelled():
                with contextlib.suppress(Exception):
                    self._task.result()

    async def wait_for(
        self, predicate: Callable[[dict[str, ModelT]], bool], timeout_s: float
    ) -> bool:
        """Waits until `predicate(items)` holds or the timeout passes; returns whether it held."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: predicate(self.items)), timeout_s
                )
            except TimeoutError:
                return False
        return True

    def _emit(self, kind: str, name: str, record: ModelT | None) -> None:
        for handler in self._handlers:
            try:
                handler(kind, name, record)
            except Exception:
                log.exception("informer handler failed for %s %s", kind, name)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _relist(self) -> int:
        versioned, revision = await self._records.list()
        fresh = {last_segment(v.key): v.record for v in versioned}
        for name in list(self.items):
            if name not in fresh:
                del self.items[name]
                self._emit("delete", name, None)
        for name, record in fresh.items():
            if self.items.get(name) != record:
                self.items[name] = record
                self._emit("put", name, record)
        self.ready.set()
        await self._notify()
        return revision

    async def _run(self) -> None:
        while True:
            try:
                revision = await self._relist()
                async for event in self.store.watch_prefix(
                    self._records.prefix, start_revision=revision + 1
                ):
                    name = last_segment(event.key)
                    if event.kind == "put":
                        try:
                            record = self._records.decode(event.value)
                        except Exception:
                            log.exception("undecodable record at %s", event.key)
                            continue
                        self.items[name] = record
                        self._emit("put", name, record)
                    elif self.items.pop(name, None) is not None:
                        self._emit("delete", name, None)
                    await self._notify()
            except asyncio.CancelledError:
                raise
            except aetcd.RevisionCompactedError:
                log.info("watch on %s compacted; relisting", self._records.prefix)
            except Exception as exc:
                log.warning("informer on %s failed (%s); relisting", self._records.prefix, exc)
                await asyncio.sleep(0.5)
