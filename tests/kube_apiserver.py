"""A stand-in Kubernetes API server: the real REST and watch wire protocol, over HTTP.

A real API server cannot run here, so the Kubernetes pod backend is tested against this one,
through the real `kubernetes_asyncio` client. It serves what podpool uses, as the API server
does: Pods (list with label selectors, create, get, delete with a grace period, watch as a
chunked stream of JSON event lines from a resourceVersion, 410 Gone for a compacted version,
bookmarks ignored) and reading a Deployment. Errors are `Status` objects with their HTTP code.

A "kubelet" runs what is scheduled: `NullKubelet` only moves phases; `ProcessKubelet` starts the
Pod's container command as a real process with the Pod's environment (downward API resolved),
so a FlowServe pod comes up and registers in etcd like any other. Each Pod gets its own
loopback address (127.0.0.x) as its Pod IP, so fixed container ports don't collide, as on a
cluster where each Pod has its own IP. A scheduler picks a node: a preferred node-affinity
node when one exists, else the least-loaded node matching the nodeSelector.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from deepserve.processes import bound_to_parent


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def matches(labels: dict[str, str], selector: str) -> bool:
    """Equality-based selectors (`a=b,c!=d,e`), as `kubectl -l` and the client send them."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip().rstrip("=")) != value.strip().lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


# Merge patches (RFC 7386) and strategic merge patches; for the maps podpool patches (labels)
# the two are the same: keys merge, null deletes.
PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = value


class Kubelet(Protocol):
    async def run(self, server: KubeApiServer, pod: dict[str, Any]) -> None:
        """Starts the Pod's containers on its node; reports phases through the server."""
        ...

    async def kill(self, pod: dict[str, Any], grace_s: float) -> None:
        """Stops the Pod's containers (SIGTERM, then SIGKILL after the grace period)."""
        ...


class NullKubelet:
    """Runs nothing: a scheduled Pod goes Running at once."""

    async def run(self, server: KubeApiServer, pod: dict[str, Any]) -> None:
        server.set_phase(pod["metadata"]["namespace"], pod["metadata"]["name"], "Running")

    async def kill(self, pod: dict[str, Any], grace_s: float) -> None:
        return None


class ProcessKubelet:
    """Runs each Pod's first container as a local process with the Pod's environment."""

    def __init__(self, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._waiters: set[asyncio.Task[None]] = set()

    @staticmethod
    def resolve_env(pod: dict[str, Any]) -> dict[str, str]:
        container = pod["spec"]["containers"][0]
        fields = {
            "status.podIP": pod["status"].get("podIP", ""),
            "spec.nodeName": pod["spec"].get("nodeName", ""),
            "metadata.name": pod["metadata"]["name"],
            "metadata.namespace": pod["metadata"]["namespace"],
        }
        env: dict[str, str] = {}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
            elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
                env[var["name"]] = fields[ref["fieldPath"]]
        return env

    async def run(self, server: KubeApiServer, pod: dict[str, Any]) -> None:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        command = list(pod["spec"]["containers"][0]["command"])
        if command and command[0] == "python":
            command[0] = sys.executable  # the image's interpreter: this environment's
        env = {**os.environ, **self.extra_env, **self.resolve_env(pod)}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("wb") as out:
            # From the event loop's (main) thread: the parent-death signal is tied to the thread
            # that forks, so a test run that is killed takes its "containers" with it.
            proc = await asyncio.create_subprocess_exec(
                *bound_to_parent(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = proc
        server.set_phase(namespace, name, "Running")
        waiter = asyncio.create_task(self._wait(server, namespace, name, proc))
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    async def _wait(
        self, server: KubeApiServer, namespace: str, name: str, proc: asyncio.subprocess.Process
    ) -> None:
        code = await proc.wait()
        server.set_phase(namespace, name, "Succeeded" if code == 0 else "Failed")

    async def kill(self, pod: dict[str, Any], grace_s: float) -> None:
        proc = self.procs.pop(pod["metadata"]["name"], None)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def close(self) -> None:
        for name in list(self.procs):
            await self.kill({"metadata": {"name": name}}, 5.0)


@dataclass
class Event:
    version: int
    kind: str
    obj: dict[str, Any]


@dataclass
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


class KubeApiServer:
    """Pods and Deployments in memory, served over HTTP as the API server serves them."""

    def __init__(self, kubelet: Kubelet | None = None, nodes: list[Node] | None = None) -> None:
        self.kubelet = kubelet or NullKubelet()
        self.nodes = nodes or [Node("node-a"), Node("node-b")]
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[Event] = []
        self._version = itertools.count(1000)
        self._oldest = 0  # versions at or below this were compacted away
        self._new_event = asyncio.Condition()
        self._ips = itertools.count(10)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_post("/api/v1/namespaces/{ns}/pods", self._create_pod)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_delete("/api/v1/namespaces/{ns}/pods/{name}", self._delete_pod)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", self._patch_pod)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/deployments/{name}", self._get_deploy)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        return await handler(request)

    # --- state changes (the API server's own, the scheduler's and the kubelet's) ------------

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        version = next(self._version)
        obj["metadata"]["resourceVersion"] = str(version)
        self.events.append(Event(version, kind, json.loads(json.dumps(obj))))
        task = asyncio.ensure_future(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._new_event:
            self._new_event.notify_all()

    def compact(self) -> None:
        """Forgets the event history (etcd compaction): older watch versions get 410 Gone."""
        self._oldest = self.events[-1].version if self.events else next(self._version)
        self.events.clear()

    def add_deployment(self, namespace: str, name: str) -> dict[str, Any]:
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(next(self._version)),
                "creationTimestamp": now(),
            },
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": name, "image": name}]},
                },
            },
        }
        self.deployments[(namespace, name)] = deployment
        return deployment

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        pod = self.pods.get((namespace, name))
        if pod is None or pod["status"].get("phase") == phase:
            return
        pod["status"]["phase"] = phase
        self._emit("MODIFIED", pod)

    def _schedule(self, pod: dict[str, Any]) -> str:
        selector = pod["spec"].get("nodeSelector") or {}
        fits = [n for n in self.nodes if all(n.labels.get(k) == v for k, v in selector.items())]
        if not fits:
            return ""
        preferred: list[str] = []
        for term in (
            pod["spec"]
            .get("affinity", {})
            .get("nodeAffinity", {})
            .get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ):
            for expr in term["preference"].get("matchFields", []):
                if expr["key"] == "metadata.name" and expr["operator"] == "In":
                    preferred += expr["values"]
        on_node = {
            n.name: sum(1 for p in self.pods.values() if p["spec"].get("nodeName") == n.name)
            for n in fits
        }
        favoured = [n for n in fits if n.name in preferred] or fits
        return min(favoured, key=lambda n: (on_node[n.name], n.name)).name

    async def _bind_and_run(self, pod: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # the create reply goes out first, as with a real scheduler
        node = self._schedule(pod)
        if not node:
            return  # stays Pending: nothing fits
        pod["spec"]["nodeName"] = node
        pod["status"]["podIP"] = f"127.0.0.{next(self._ips)}"
        pod["status"]["hostIP"] = "127.0.0.1"
        self._emit("MODIFIED", pod)
        await self.kubelet.run(self, pod)

    async def _finish_delete(self, pod: dict[str, Any], grace_s: float) -> None:
        await self.kubelet.kill(pod, grace_s)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if self.pods.pop(key, None) is not None:
            self._emit("DELETED", pod)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- handlers --------------------------------------------------------------------------

    def _selected(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [
            pod
            for (ns, _), pod in sorted(self.pods.items())
            if ns == namespace and matches(pod["metadata"].get("labels") or {}, selector)
        ]

    async def _list_pods(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, namespace, selector)
        version = self.events[-1].version if self.events else self._oldest
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(version)},
                "items": self._selected(namespace, selector),
            }
        )

    async def _watch(
        self, request: web.Request, namespace: str, selector: str
    ) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        timeout_s = float(request.query.get("timeoutSeconds", "1800"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            line = json.dumps({"type": kind, "object": obj}) + "\n"
            await response.write(line.encode())

        if since and since != "0" and int(since) < self._oldest:
            await send(
                "ERROR",
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": f"too old resource version: {since} ({self._oldest})",
                    "reason": "Expired",
                    "code": 410,
                },
            )
            return response
        if not since or since == "0":
            # No version: the current state as synthetic ADDED events, then changes.
            for pod in self._selected(namespace, selector):
                await send("ADDED", pod)
            cursor = self.events[-1].version if self.events else 0
        else:
            cursor = int(since)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while loop.time() < deadline:
                for event in [e for e in self.events if e.version > cursor]:
                    cursor = event.version
                    meta = event.obj["metadata"]
                    if meta["namespace"] == namespace and matches(
                        meta.get("labels") or {}, selector
                    ):
                        await send(event.kind, event.obj)
                async with self._new_event:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._new_event.wait(), max(0.0, deadline - loop.time())
                        )
        return response

    async def _create_pod(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        try:
            pod = await request.json()
        except json.JSONDecodeError:
            return status(400, "BadRequest", "body is not JSON")
        meta = pod.setdefault("metadata", {})
        name = meta.get("name", "")
        if not name or not pod.get("spec", {}).get("containers"):
            return status(422, "Invalid", "Pod is invalid: metadata.name and spec.containers")
        if meta.get("namespace", namespace) != namespace:
            return status(400, "BadRequest", "the namespace of the object does not match")
        if (namespace, name) in self.pods:
            return status(409, "AlreadyExists", f'pods "{name}" already exists')
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now())
        pod["status"] = {"phase": "Pending"}
        self.pods[(namespace, name)] = pod
        self._emit("ADDED", pod)
        self._spawn(self._bind_and_run(pod))
        return web.json_response(pod, status=201)

    def _pod(self, request: web.Request) -> dict[str, Any] | None:
        return self.pods.get((request.match_info["ns"], request.match_info["name"]))

    async def _get_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response(pod)

    async def _delete_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        body: dict[str, Any] = {}
        if request.can_read_body:
            with contextlib.suppress(json.JSONDecodeError):
                body = await request.json() or {}
        grace = request.query.get("gracePeriodSeconds") or body.get("gracePeriodSeconds")
        grace_s = float(grace) if grace is not None else 30.0
        if not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"]["deletionTimestamp"] = now()
            pod["metadata"]["deletionGracePeriodSeconds"] = int(grace_s)
            self._emit("MODIFIED", pod)
            self._spawn(self._finish_delete(pod, grace_s))
        return web.json_response(pod)

    async def _patch_pod(self, request: web.Request) -> web.Response:
        pod = self._pod(request)
        if pod is None:
            return status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        kind = request.content_type
        if kind not in PATCH_TYPES:
            return status(415, "UnsupportedMediaType", f"the media type {kind!r} is not supported")
        patch = await request.json()
        if not isinstance(patch, dict):
            return status(400, "BadRequest", "a merge patch is a JSON object")
        merge_patch(pod, patch)
        self._emit("MODIFIED", pod)
        return web.json_response(pod)

    async def _get_deploy(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        deployment = self.deployments.get(key)
        if deployment is None:
            return status(404, "NotFound", f'deployments.apps "{key[1]}" not found')
        return web.json_response(deployment)


@contextlib.asynccontextmanager
async def kube_apiserver(
    kubelet: Kubelet | None = None, nodes: list[Node] | None = None
) -> AsyncIterator[KubeApiServer]:
    server = KubeApiServer(kubelet, nodes)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
