"""Labels that say what an engine Pod serves, kept equal to its pod record in etcd.

A warm Pod is made before anyone knows its model, so the template cannot carry it. Kubernetes
routers select Pods by label (an InferencePool's selector, llm-d's prefill/decode filters), so
when a pod is assigned a model (or returned warm) podpool patches the Pod's labels to match:
`deepserve.io/model` (the model name made label-safe) and `deepserve.io/role`. etcd stays the
source of truth; the labels follow it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from deepserve.background import stop_tasks
from deepserve.records import PodRecord, PodState

log = logging.getLogger(__name__)

MODEL_LABEL = "deepserve.io/model"
ROLE_LABEL = "deepserve.io/role"

_NOT_LABEL_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(text: str) -> str:
    """`text` as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends
    (`org/Model-1B` -> `org-Model-1B`; a path keeps its last parts)."""
    safe = _NOT_LABEL_SAFE.sub("-", text)[-63:]
    return safe.strip("-_.")


def pod_labels(pod: PodRecord) -> dict[str, str | None]:
    """The labels for `pod` as etcd has it; None removes a label (a warm pod serves nothing)."""
    if pod.state != PodState.ASSIGNED or not pod.model:
        return {MODEL_LABEL: None, ROLE_LABEL: None}
    return {MODEL_LABEL: label_value(pod.model), ROLE_LABEL: pod.role.value}


class PodModelLabeler:
    """Patches each owned Pod's labels when its record's model or role changes."""

    def __init__(
        self,
        owned: Callable[[str], bool],
        patch: Callable[[str, dict[str, str | None]], Awaitable[None]],
    ) -> None:
        self._owned = owned
        self._patch = patch
        self._applied: dict[str, dict[str, str | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, kind: str, pod_id: str, record: PodRecord | None) -> None:
        """A PodView handler."""
        if kind != "put" or record is None:
            self._applied.pop(pod_id, None)
            return
        if not self._owned(pod_id):
            return
        wanted = pod_labels(record)
        if self._applied.get(pod_id, {MODEL_LABEL: None, ROLE_LABEL: None}) == wanted:
            return
        self._applied[pod_id] = wanted
        task = asyncio.ensure_future(self._apply(pod_id, wanted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, pod_id: str, labels: dict[str, str | None]) -> None:
        try:
            await self._patch(pod_id, labels)
        except Exception as exc:  # the next change retries; routing by label lags meanwhile
            self._applied.pop(pod_id, None)
            log.warning("labelling pod %s failed: %s", pod_id, exc)

    async def close(self) -> None:
        await stop_tasks(list(self._tasks))
