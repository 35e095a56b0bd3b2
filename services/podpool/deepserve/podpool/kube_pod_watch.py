"""Follows the pool's engine Pods through the API server's watch (list once, then events).

The usual informer shape: a list gives the current Pods and a resourceVersion, a watch from it
streams ADDED/MODIFIED/DELETED events; when the stream ends it resumes from the last version,
and when that version is too old (410 Gone) it lists again. Nothing is polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from deepserve.background import stop_task

log = logging.getLogger(__name__)

# Phases after which a Pod never runs again (restartPolicy: Never).
ENDED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class KubePod:
    """What the pool needs to know of one Pod."""

    name: str
    uid: str
    phase: str
    node: str
    deleting: bool
    created: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.phase in ENDED_PHASES

    @staticmethod
    def from_manifest(obj: dict[str, Any]) -> KubePod:
        meta = obj.get("metadata") or {}
        return KubePod(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            phase=(obj.get("status") or {}).get("phase") or "Pending",
            node=(obj.get("spec") or {}).get("nodeName") or "",
            deleting=bool(meta.get("deletionTimestamp")),
            created=meta.get("creationTimestamp") or "",
            labels=dict(meta.get("labels") or {}),
        )


Handler = Callable[[str, KubePod], None]


class KubePodWatch:
    """The pool's Pods by name, kept current by a watch; handlers see every change."""

    def __init__(
        self,
        api: client.CoreV1Api,
        namespace: str,
        label_selector: str,
        *,
        watch_timeout_s: int = 300,
        retry_s: float = 1.0,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._selector = label_selector
        self._watch_timeout_s = watch_timeout_s
        self._retry_s = retry_s
        self.pods: dict[str, KubePod] = {}
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        self._handlers: list[Handler] = []
        self._task: asyncio.Task[None] | None = None
        self._watch: watch.Watch | None = None

    def add_handler(self, handler: Handler) -> None:
        """Calls handler(kind, pod) for each change; kind is "put" or "delete"."""
        self._handlers.append(handler)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kube-pod-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        await stop_task(self._task)
        if self._watch is not None:
            await self._watch.close()

    async def wait_for(
        self, predicate: Callable[[dict[str, KubePod]], bool], timeout_s: float
    ) -> bool:
        """Waits until predicate(pods) holds; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate(self.pods):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    # --- internals -------------------------------------------------------------------------

    def _apply(self, kind: str, pod: KubePod) -> None:
        if kind == "delete":
            self.pods.pop(pod.name, None)
        else:
            self.pods[pod.name] = pod
        self.changed.set()
        for handler in self._handlers:
            try:
                handler(kind, pod)
            except Exception:
                log.exception("pod watch handler failed")

    async def _list(self) -> str:
        listed = await self._api.list_namespaced_pod(
            self._namespace, label_selector=self._selector, _preload_content=False
        )
        body = await listed.json()
        current = {p.name: p for p in map(KubePod.from_manifest, body.get("items") or [])}
        for name in set(self.pods) - set(current):
            self._apply("delete", self.pods[name])
        for pod in current.values():
            if self.pods.get(pod.name) != pod:
                self._apply("put", pod)
        self.ready.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _run(self) -> None:
        version = ""
        while True:
            try:
                if not version:
                    version = await self._list()
                version = await self._follow(version)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:  # our version was compacted away: list again
                    version = ""
                    continue
                log.warning("pod watch failed (%s); retrying", exc.status)
                version = ""
                await asyncio.sleep(self._retry_s)
            except Exception as exc:
                log.warning("pod watch failed: %s; retrying", exc)
                version = ""
                await asyncio.sleep(self._retry_s)

    async def _follow(self, version: str) -> str:
        """Streams events from `version` until the server ends the watch; returns the last one."""
        self._watch = watch.Watch()
        async with self._watch.stream(
            self._api.list_namespaced_pod,
            self._namespace,
            label_selector=self._selector,
            resource_version=version,
            timeout_seconds=self._watch_timeout_s,
            allow_watch_bookmarks=True,
        ) as events:
            async for event in events:
                kind = event["type"]
                obj = event["raw_object"]
                version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED"):
                    self._apply("put", KubePod.from_manifest(obj))
                elif kind == "DELETED":
                    self._apply("delete", KubePod.from_manifest(obj))
        return version
