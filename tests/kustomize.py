"""Just enough kustomize for this repository's k8s/ (resources, namespace, images, JSON 6902 patches,
ConfigMaps generated from files without a name hash), in
Python, so the manifests are rendered and validated where no `kubectl` is installed. Where `kubectl` is,
the tests check this render is identical to `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "configMapGenerator",
             "generatorOptions"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    if unsupported:
        raise ValueError(f"{directory}: this renderer does not support {sorted(unsupported)}")
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else [o for o in yaml.safe_load_all(path.read_text()) if o]
    if not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        if kustomization.get("configMapGenerator"):
            raise ValueError(f"{directory}: this renderer supports generated ConfigMaps without a name hash only")
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        if generator.get("behavior") == "merge":
            [existing] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == generator["name"]]
            existing["data"].update(data)
        else:
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                            "data": data})
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for container in _containers(objects):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        for obj in objects:
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
                for op in yaml.safe_load(patch["patch"]):
                    _apply(obj, op)
    return objects


def _containers(objects: list[dict]):
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        yield from spec.get("containers", []) + spec.get("initContainers", [])


def _apply(obj: dict, op: dict) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    node = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] in ("add", "replace"):
        if op["op"] == "replace" and last not in node:
            raise KeyError(f"replace: {op['path']} does not exist")
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[last]
    else:
        raise ValueError(f"unsupported patch op {op['op']!r}")


def key(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
