"""The Kubernetes pod backend: each pod is an engine Pod made from the pool's template.

podpool creates a Pod for a warm pod and deletes it when the pod is released or trimmed. It
follows its Pods through a watch (KubePodWatch), never by polling. The Pods register in etcd
themselves, as every pod does: the pool learns of them through its PodView as before.

Pods outlive podpool (their owner is podpool's Deployment, not a podpool process), so after a
restart podpool adopts its Pods by label: registered ones and ones still starting are kept,
ended ones and ones that never registered are deleted (orphan reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from deepserve.errors import InvalidArgument, PermissionDenied, Unavailable
from deepserve.podpool.kube_pod_template import (
    KUBERNETES_BACKEND,
    OwnerRef,
    PodTemplate,
    pool_selector,
)
from deepserve.podpool.kube_pod_watch import KubePod, KubePodWatch
from deepserve.podpool.kube_settings import KubeBackendSettings
from deepserve.podpool.settings import PodPoolSettings
from deepserve.records import PodRecord

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


async def api_client(kube: KubeBackendSettings) -> client.ApiClient:
    """A client for the configured API server, the in-cluster one, or ~/.kube/config's."""
    if kube.api_url:
        configuration = client.Configuration(host=kube.api_url)
        return client.ApiClient(configuration)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


def own_namespace(kube: KubeBackendSettings) -> str:
    if kube.namespace:
        return kube.namespace
    with contextlib.suppress(OSError):
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def _age_s(pod: KubePod) -> float:
    if not pod.created:
        return 0.0
    try:
        created = datetime.fromisoformat(pod.created.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(UTC) - created).total_seconds()


class KubernetesBackend:
    """Starts pods as Kubernetes Pods and ends them; follows them by watch."""

    name = KUBERNETES_BACKEND

    def __init__(
        self,
        settings: PodPoolSettings,
        kube: KubeBackendSettings | None = None,
        *,
        on_pod_ended: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self.kube = kube or KubeBackendSettings()
        self.template = PodTemplate(settings, self.kube)
        self.namespace = own_namespace(self.kube)
        # Called with a pod id when its Pod ends or vanishes: drop its etcd registration now
        # instead of at lease expiry.
        self.on_pod_ended = on_pod_ended
        self._client: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None
        self.watch: KubePodWatch | None = None
        self.owner: OwnerRef | None = None
        # Pods this pool owns (created, or adopted after a restart) -> when it took them.
        self._owned: dict[str, float] = {}
        # Pods whose end was already seen (reported by reap once).
        self._ended: set[str] = set()
        # Pod id -> nodes its Pod should prefer (set by node placement before a cold start).
        self._preferred: dict[str, list[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, registered: Callable[[str], bool]) -> None:
        """Connects, starts the watch, and reconciles the Pods a previous podpool left."""
        self._client = await api_client(self.kube)
        self._core = client.CoreV1Api(self._client)
        if self.kube.owner_deployment:
            apps = client.AppsV1Api(self._client)
            deployment = await apps.read_namespaced_deployment(
                self.kube.owner_deployment, self.namespace
            )
            self.owner = OwnerRef(
                "apps/v1", "Deployment", self.kube.owner_deployment, deployment.metadata.uid
            )
        self.watch = KubePodWatch(self._core, self.namespace, pool_selector(self.kube))
        self.watch.add_handler(self._on_pod)
        self.watch.start()
        await asyncio.wait_for(self.watch.ready.wait(), 60)
        await self.reconcile_orphans(registered)

    async def reconcile_orphans(self, registered: Callable[[str], bool]) -> None:
        """Adopts this pool's Pods that are registered or still starting; deletes the rest."""
        assert self.watch is not None
        adopted, deleted = [], []
        for pod in list(self.watch.pods.values()):
            if pod.name in self._owned or pod.deleting:
                continue
            keep = not pod.ended and (
                registered(pod.name) or _age_s(pod) < self._settings.pod_start_timeout_s
            )
            if keep:
                self._owned[pod.name] = time.monotonic()
                adopted.append(pod.name)
            else:
                await self._delete(pod.name)
                deleted.append(pod.name)
        log.info(
            "pods reconciled after start",
            extra={"fields": {"adopted": adopted, "deleted": deleted}},
        )

    async def close(self) -> None:
        """Stops following the Pods; they keep running (a podpool restart adopts them, deleting
        podpool's Deployment deletes them through their owner reference)."""
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        if self.watch is not None:
            await self.watch.stop()
        if self._client is not None:
            await self._client.close()

    # --- PodBackend ------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        # The model files live on the Pods' volume, not podpool's: the Pod checks them at
        # LoadModel (a refusal leaves it warm).
        if not model.strip():
            raise InvalidArgument("model is empty", field="model")

    def prefer_nodes(self, pod_id: str, nodes: list[str]) -> None:
        """The next create_pod(pod_id) asks the scheduler for one of `nodes` (when it can)."""
        if nodes:
            self._preferred[pod_id] = list(nodes)

    async def create_pod(self, pod_id: str) -> None:
        assert self._core is not None, "start() first"
        manifest = self.template.manifest(
            pod_id,
            namespace=self.namespace,
            owner=self.owner,
            preferred_nodes=self._preferred.pop(pod_id, None),
        )
        try:
            await self._core.create_namespaced_pod(self.namespace, manifest)
        except ApiException as exc:
            if exc.status == 409:  # a retry after a lost reply: it exists already
                log.info("pod exists already", extra={"fields": {"pod_id": pod_id}})
            elif exc.status == 403:
                raise PermissionDenied(f"creating pod {pod_id}: {exc.reason}") from None
            elif exc.status in (400, 422):
                raise InvalidArgument(f"pod template rejected: {exc.reason}", field="pod") from None
            else:
                raise Unavailable(f"creating pod {pod_id}: {exc.status} {exc.reason}") from None
        self._owned[pod_id] = time.monotonic()
        log.info("pod created", extra={"fields": {"pod_id": pod_id, "namespace": self.namespace}})

    def is_starting(self, pod_id: str) -> bool:
        if pod_id not in self._owned:
            return False
        pod = self.watch.pods.get(pod_id) if self.watch is not None else None
        if pod is None:
            # Created, not yet seen by the watch (it trails the POST by a moment).
            return pod_id not in self._ended
        return not pod.ended and not pod.deleting

    def started_here(self, pod_id: str) -> bool:
        return pod_id in self._owned

    def node_of(self, pod_id: str) -> str:
        """The node a Pod runs on ("" until scheduled)."""
        pod = self.watch.pods.get(pod_id) if self.watch is not None else None
        return pod.node if pod is not None else ""

    async def patch_labels(self, pod_id: str, labels: dict[str, str | None]) -> None:
        """Sets (None: removes) labels of a Pod (a strategic merge patch of its metadata)."""
        assert self._core is not None
        try:
            await self._core.patch_namespaced_pod(
                pod_id, self.namespace, {"metadata": {"labels": labels}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise Unavailable(f"labelling pod {pod_id}: {exc.status} {exc.reason}") from None

    async def delete_pod(self, pod: PodRecord) -> None:
        self._owned.pop(pod.pod_id, None)
        self._preferred.pop(pod.pod_id, None)
        await self._delete(pod.pod_id)
        log.info("pod ended", extra={"fields": {"pod_id": pod.pod_id}})

    def warm_unevenly_spread(self) -> bool:
        return False  # the Kubernetes scheduler places Pods; the pool does not move them

    def reap(self) -> list[str]:
        """Forgets owned Pods that ended or vanished; returns their ids."""
        gone = sorted(self._ended & set(self._owned))
        for pod_id in gone:
            del self._owned[pod_id]
        # Keep only ends of Pods still listed (a Failed one being deleted): each is handled once.
        listed = self.watch.pods if self.watch is not None else {}
        self._ended = {pod_id for pod_id in self._ended if pod_id in listed}
        return gone

    # --- internals -------------------------------------------------------------------------

    async def _delete(self, pod_id: str) -> None:
        assert self._core is not None
        try:
            await self._core.delete_namespaced_pod(
                pod_id, self.namespace, grace_period_seconds=self.kube.termination_grace_s
            )
        except ApiException as exc:
            if exc.status != 404:  # already gone: deleting is idempotent
                raise Unavailable(f"deleting pod {pod_id}: {exc.status} {exc.reason}") from None

    def _on_pod(self, kind: str, pod: KubePod) -> None:
        if kind == "put" and not pod.ended:
            return
        if pod.name in self._ended:
            return
        self._ended.add(pod.name)
        log.info(
            "pod %s", "ended" if kind == "put" else "deleted",
            extra={"fields": {"pod_id": pod.name, "phase": pod.phase, "node": pod.node}},
        )  # fmt: skip
        # An ended Pod (restartPolicy Never) stays as an object until deleted: delete it.
        work = [self.on_pod_ended(pod.name)] if self.on_pod_ended is not None else []
        if kind == "put":
            work.append(self._delete(pod.name))
        for coro in work:
            task = asyncio.ensure_future(self._quietly(coro))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _quietly(work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("pod clean-up failed: %s", exc)
