"""Which routing policy each model's deployment asked for, mirrored from the jobs in etcd."""

from __future__ import annotations

from deepserve.jobs.records import JobKind, JobRecord, RoutingPolicy
from deepserve.store.etcd import EtcdStore, TypedPrefix
from deepserve.store.informer import Informer
from deepserve.store.keys import Keys


class PolicyTable:
    """model -> policy of its newest live serving job; `default` for models without one."""

    def __init__(self, store: EtcdStore | None, default: RoutingPolicy) -> None:
        self.default = default
        self._informer = (
            Informer(TypedPrefix(store, Keys.jobs_prefix(), JobRecord, Keys.job))
            if store is not None
            else None
        )
        self._by_model: dict[str, RoutingPolicy] = {}
        if self._informer is not None:
            self._informer.add_handler(lambda *_: self._rebuild())

    def start(self) -> None:
        if self._informer is not None:
            self._informer.start()

    async def stop(self) -> None:
        if self._informer is not None:
            await self._informer.stop()

    def policy_for(self, model: str) -> RoutingPolicy:
        return self._by_model.get(model, self.default)

    def set_policy(self, model: str, policy: RoutingPolicy) -> None:
        self._by_model[model] = policy

    def _rebuild(self) -> None:
        assert self._informer is not None
        live = sorted(
            (
                j
                for j in self._informer.items.values()
                if j.kind == JobKind.SERVING and j.serving and not j.status.phase.terminal
            ),
            key=lambda j: j.created_at,
        )
        self._by_model = {j.serving.model: j.serving.policy for j in live if j.serving}
