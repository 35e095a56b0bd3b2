"""An offline renderer for the kustomize features deploy/kubernetes uses.

No kustomize binary installs from the registries reachable here, so the test command renders the
overlays with this: `resources` (files and directories), `components`, `patches` (JSON 6902
operation lists, or strategic-merge maps where lists of named items merge by name), `images`
(newName/newTag/digest) and `namespace` (on namespaced objects, and on the ServiceAccount
subjects of role bindings). A kustomization using anything else is refused, so the manifests
never rely on a feature this renderer would silently skip; `kubectl apply -k` renders the same
files the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "IngressClass",
    "GatewayClass",
}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "Pod": ("spec",),
}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[Obj]:
    # A JSON round trip breaks YAML anchors/aliases apart, so a patch changes one place only.
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return [json.loads(json.dumps(d)) for d in docs]


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build directory` makes."""
    return _build(directory, [], component=False)


def _kustomization(directory: Path, *, component: bool) -> Obj:
    files = [directory / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        raise KustomizeError(f"no kustomization in {directory}")
    spec = yaml.safe_load(found.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{found}: unsupported fields {sorted(unknown)}")
    want = "Component" if component else "Kustomization"
    if spec.get("kind", "Kustomization") != want:
        raise KustomizeError(f"{found}: kind {spec.get('kind')!r}, expected {want}")
    return spec


def _build(directory: Path, accumulated: list[Obj], *, component: bool) -> list[Obj]:
    spec = _kustomization(directory, component=component)
    objects = list(accumulated)
    for entry in spec.get("resources") or []:
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for entry in spec.get("components") or []:
        objects = _build((directory / entry).resolve(), objects, component=True)
    for patch in spec.get("patches") or []:
        _apply_patch(directory, patch, objects)
    for image in spec.get("images") or []:
        _set_image(image, objects)
    if namespace := spec.get("namespace"):
        _set_namespace(namespace, objects)
    _check_unique(objects)
    return objects


def _check_unique(objects: list[Obj]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        meta = obj.get("metadata") or {}
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        if key in seen:
            raise KustomizeError(f"duplicate object {key}")
        seen.add(key)


def _selects(target: Obj, obj: Obj) -> bool:
    meta = obj.get("metadata") or {}
    if "kind" in target and target["kind"] != obj.get("kind"):
        return False
    if "name" in target and target["name"] != meta.get("name"):
        return False
    if "namespace" in target and target["namespace"] != meta.get("namespace"):
        return False
    return True


def _apply_patch(directory: Path, entry: Obj, objects: list[Obj]) -> None:
    if "path" in entry:
        body = yaml.safe_load((directory / entry["path"]).read_text())
    elif "patch" in entry:
        body = yaml.safe_load(entry["patch"])
    else:
        raise KustomizeError(f"patch without path or patch: {entry}")
    target = entry.get("target")
    if isinstance(body, list):
        if target is None:
            raise KustomizeError("a JSON 6902 patch needs a target")
        hits = [o for o in objects if _selects(target, o)]
        for obj in hits:
            for op in body:
                _json6902(obj, op)
    else:
        target = target or {"kind": body.get("kind"), "name": body["metadata"]["name"]}
        hits = [o for o in objects if _selects(target, o)]
        for obj in hits:
            _strategic_merge(obj, copy.deepcopy(body))
    if not hits:
        raise KustomizeError(f"patch {entry} matches no object")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, op: Obj) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = obj
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        elif op["op"] == "add" and part not in node:
            node = node.setdefault(part, {})
        else:
            node = node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, op["value"])
        elif kind == "replace":
            node[index] = op["value"]
        elif kind == "remove":
            del node[index]
        else:
            raise KustomizeError(f"unsupported op {kind}")
        return
    if kind in ("replace", "remove", "test") and last not in node:
        raise KustomizeError(f"{kind} {op['path']}: no such member")
    if kind in ("add", "replace"):
        node[last] = op["value"]
    elif kind == "remove":
        del node[last]
    elif kind == "test":
        if node[last] != op["value"]:
            raise KustomizeError(f"test {op['path']} failed")
    else:
        raise KustomizeError(f"unsupported op {kind}")


def _strategic_merge(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _strategic_merge(target[key], value)
        elif (
            isinstance(value, list)
            and isinstance(target.get(key), list)
            and all(isinstance(v, dict) and "name" in v for v in value + target[key])
        ):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    _strategic_merge(by_name[item["name"]], item)
                else:
                    target[key].append(item)
        else:
            target[key] = value


def _containers(obj: Obj) -> list[Obj]:
    path = POD_TEMPLATE_PATHS.get(obj.get("kind", ""))
    if path is None:
        return []
    spec: Any = obj
    for part in path:
        spec = spec.get(part) or {}
    return list(spec.get("containers") or []) + list(spec.get("initContainers") or [])


def _set_image(entry: Obj, objects: list[Obj]) -> None:
    for obj in objects:
        for container in _containers(obj):
            image = container.get("image", "")
            name = image.split("@")[0]
            if ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            if name != entry["name"]:
                continue
            new = entry.get("newName", name)
            if "digest" in entry:
                container["image"] = f"{new}@{entry['digest']}"
            elif "newTag" in entry:
                container["image"] = f"{new}:{entry['newTag']}"
            else:
                container["image"] = image.replace(name, new, 1)


def _set_namespace(namespace: str, objects: list[Obj]) -> None:
    for obj in objects:
        if obj.get("kind") not in CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = namespace
        if obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" and not subject.get("namespace"):
                    subject["namespace"] = namespace
