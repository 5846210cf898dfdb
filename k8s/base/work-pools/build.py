"""Write the `kubernetes` work pools' job templates and the GPU overlays: prefect-kubernetes' own default
template, with this project's settings and one GPU_OVERLAYS row per overlay.

    python k8s/base/work-pools/build.py        # after upgrading prefect-kubernetes, or editing a setting below

Outputs (commit them; tests check they are up to date):
  k8s/base/work-pools/imagic-gpu.json, imagic-cpu.json     generic: any cluster with the NVIDIA device plugin
  k8s/overlays/<gpu overlay>/kustomization.yaml            base + the cloud's component + the two templates below
  k8s/overlays/<gpu overlay>/imagic-gpu.json               the row's card, on-demand nodes
  k8s/overlays/<gpu overlay>/imagic-gpu-spot.json          the same card on spot nodes (k8s/components/spot)
  k8s/overlays/dev/imagic-gpu.json                         a laptop cluster: the same pods, on the CPU
The workers create their pool from these at first start (k8s/base/worker.yaml: a ConfigMap, `--base-job-template`).
`python k8s/base/work-pools/build.py --table` prints the overlay table of docs/deploy.md (a test compares them).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

K8S = Path(__file__).resolve().parents[2]
REPO = K8S.parent
TERMINATION_GRACE_S = 120  # AWS gives spot instances 2 minutes' notice; GKE spot nodes 30 s whatever this says
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_PRIORITY_CLASS = "imagic-gpu"  # k8s/base/priority-class.yaml
STARTUP_S = 1800  # a chunk pod's image pull, model sync from S3, load and hash, on a cold node


class GpuOverlay(NamedTuple):
    cloud: str             # gke | eks: the component (k8s/components/<cloud>) and the node labels
    card: str              # as the cloud's labels name it (lower-cased on EKS)
    memory_gb: int         # per GPU
    machine: str           # GKE: the machine type of the node pool you create; EKS: what the labels select
    gpus_per_node: int     # max_in_flight and the pool's concurrency come in multiples of it
    accelerator: str = ""  # GKE: the node pool's cloud.google.com/gke-accelerator


# One row per GPU overlay. The 40 GB rows keep the names they always had; the 80 GB sizing of the docs
# (LoRA on an IF cascade, SDXL full fine-tunes) needs the *-80gb or *-h100 rows.
GPU_OVERLAYS = {
    "gke-a100": GpuOverlay("gke", "A100", 40, "a2-highgpu-8g", 8, "nvidia-tesla-a100"),
    "gke-a100-80gb": GpuOverlay("gke", "A100", 80, "a2-ultragpu-8g", 8, "nvidia-a100-80gb"),
    "gke-h100": GpuOverlay("gke", "H100", 80, "a3-highgpu-8g", 8, "nvidia-h100-80gb"),
    "eks-a100": GpuOverlay("eks", "A100", 40, "p4d.24xlarge", 8),
    "eks-a100-80gb": GpuOverlay("eks", "A100", 80, "p4de.24xlarge", 8),
    "eks-h100": GpuOverlay("eks", "H100", 80, "p5.48xlarge", 8),
}
CLOUDS = {"gke": "A node pool of them that scales from zero (yours to create); Filestore for the model cache.",
          "eks": "Karpenter provisions them from a NodePool; EFS for the model cache; IRSA for S3 (no keys)."}

# What differs per pool: the pod's size, where it may run, and (GPU only) its priority and deadline.
POOLS = {
    "imagic-gpu": {"gpu_count": 1, "cpu_request": "8", "memory_request": "48Gi", "memory_limit": "64Gi",
                   "node_selector": {}, "tolerations": [GPU_TOLERATION], "priority_class": GPU_PRIORITY_CLASS},
    # No deadline for the parent: it lives as long as its batch, and a re-run resumes it anyway.
    "imagic-cpu": {"gpu_count": 0, "cpu_request": "500m", "memory_request": "1Gi", "memory_limit": "2Gi",
                   "node_selector": {}, "tolerations": []},
}
# A laptop cluster (kind, k3d, minikube) has no GPU: the same pods, on the CPU.
DEV = {"gpu_count": 0, "cpu_request": "1", "memory_request": "2Gi", "memory_limit": "6Gi", "tolerations": [],
       "pod_watch_timeout_seconds": 300}


def placement(overlay: GpuOverlay, spot: bool) -> dict:
    """The node selector and tolerations of an overlay's GPU pods, on on-demand or on spot nodes."""
    tolerations = [GPU_TOLERATION]
    if overlay.cloud == "gke":
        # The label names card and memory; GPUs per node are the node pool's machine type (yours to create).
        selector = {"cloud.google.com/gke-accelerator": overlay.accelerator}
        if spot:  # GKE's advice: taint spot pools so that only work that tolerates preemption lands there
            selector["cloud.google.com/gke-spot"] = "true"
            tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                "effect": "NoSchedule"})
    else:
        # Karpenter picks the instance: name, memory (MiB) and count pin one type, so that max_in_flight
        # fills whole nodes ("a100" alone also matches p4de, "h100" also the one-GPU p5.4xlarge).
        selector = {"karpenter.k8s.aws/instance-gpu-name": overlay.card.lower(),
                    "karpenter.k8s.aws/instance-gpu-memory": str(overlay.memory_gb * 1024),
                    "karpenter.k8s.aws/instance-gpu-count": str(overlay.gpus_per_node),
                    "karpenter.sh/capacity-type": "spot" if spot else "on-demand"}
        if spot:  # for a spot NodePool tainted like GKE's
            tolerations.append({"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot",
                                "effect": "NoSchedule"})
    return {"node_selector": selector, "tolerations": tolerations}


def active_deadline_s(pod_watch_timeout_s: int) -> int:
    """The GPU Job's activeDeadlineSeconds: a stuck pod (a hung download, a wedged driver) is stopped, and the
    parent runs its chunk again; a working one never is. The clock starts when the Job is created, so: the
    wait for a node, start-up, then bulk-edit's default chunk_size (prefect.yaml) entries each allowed
    IMAGIC_ENTRY_TIMEOUT_S (settings.yaml), rounded up to the hour: 8 × 1 h + 15 min + 30 min → 9 h."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [bulk_edit] = [d for d in project["deployments"] if d["name"] == "bulk-edit"]
    settings = yaml.safe_load((K8S / "base" / "settings.yaml").read_text())
    total = (bulk_edit["parameters"]["chunk_size"] * float(settings["data"]["IMAGIC_ENTRY_TIMEOUT_S"])
             + pod_watch_timeout_s + STARTUP_S)
    return math.ceil(total / 3600) * 3600


def variable(title: str, default, description: str, type_: str) -> dict:
    return {"title": title, "default": default, "description": description, "type": type_}


def build(pool: dict) -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    variables = template["variables"]["properties"]
    pod_watch_timeout_s = pool.get("pod_watch_timeout_seconds", 900)
    # Defaults for Prefect's own variables: GPU pools scale from zero, so pods may wait minutes for a node.
    defaults = {"namespace": "imagic", "image": "registry.example.com/imagic-batch:0.1.0",
                "service_account_name": "imagic-flow-run", "backoff_limit": 0, "finished_job_ttl": 3600,
                "pod_watch_timeout_seconds": pod_watch_timeout_s,
                "cpu_request": pool["cpu_request"], "memory_request": pool["memory_request"],
                "memory_limit": pool["memory_limit"]}
    for name, value in defaults.items():
        variables[name]["default"] = value
    variables.update({
        "gpu_count": {**variable("GPUs", pool["gpu_count"], "nvidia.com/gpu per flow-run pod.", "integer"),
                      "minimum": 0},
        "node_selector": {**variable("Node selector", pool["node_selector"], "Node labels the pod requires.",
                                     "object"), "additionalProperties": {"type": "string"}},
        "tolerations": {**variable("Tolerations", pool["tolerations"], "Taints the pod tolerates.", "array"),
                        "items": {"type": "object"}},
        "model_cache_claim": variable("Model cache PVC", "imagic-model-cache",
                                      "PersistentVolumeClaim mounted at /models (weights, hub cache).", "string"),
        "settings_config_map": variable("Settings ConfigMap", "imagic-settings",
                                        "ConfigMap of env (Prefect API URL, S3 endpoint, caches).", "string"),
        # The workers never see these keys: they have only the Prefect API key (Secret imagic-worker).
        "credentials_secret": variable("Credentials Secret", "imagic-job",
                                       "Secret of env for the flow-run pods (S3 keys, HF_TOKEN); optional.",
                                       "string"),
    })

    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    # prefect-kubernetes' default puts these Job fields in the pod spec, where the API server drops them
    # (and strict validation rejects them): move them where they mean something.
    for field in ("completions", "parallelism"):
        if field in pod:
            job[field] = pod.pop(field)
    if "priority_class" in pool:
        variables["active_deadline_seconds"] = {
            **variable("Job deadline (s)", active_deadline_s(pod_watch_timeout_s),
                       "Seconds from the Job's creation until Kubernetes stops it (node wait included); "
                       "raise it with chunk_size or IMAGIC_ENTRY_TIMEOUT_S.", "integer"), "minimum": 1}
        variables["priority_class_name"] = variable("PriorityClass", pool["priority_class"],
                                                    "The flow-run pods' PriorityClass.", "string")
        job["activeDeadlineSeconds"] = "{{ active_deadline_seconds }}"
        pod["priorityClassName"] = "{{ priority_class_name }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}
    # After SIGTERM (a spot node reclaimed, a drain, the deadline) the edit stops at its next training step and
    # saves its training for the retry (imagic/engine/checkpoints.py): time for that before the kill.
    pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_S
    pod["volumes"] = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "{{ model_cache_claim }}"}},
                      # torch's shared-memory tensors and tmp files; the container default of 64 MiB is too small
                      {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["envFrom"] = [{"configMapRef": {"name": "{{ settings_config_map }}"}},
                            {"secretRef": {"name": "{{ credentials_secret }}", "optional": True}}]
    container["volumeMounts"] = [{"name": "model-cache", "mountPath": "/models"},
                                 {"name": "dshm", "mountPath": "/dev/shm"}]
    return template


KUSTOMIZATION = """\
# {cloud_title}, {card} {memory_gb} GB: {machine} nodes ({gpus_per_node} GPUs each).
# {about}
# Generated by k8s/base/work-pools/build.py from its GPU_OVERLAYS table: edit the table and re-run, not this file.
# Spot nodes instead: add k8s/components/spot (docs/deploy.md, "Spot and preemptible GPUs").
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
components:
  - ../../components/{cloud_name}  # your registry, the model cache's storage class{irsa}
# This card's GPU job templates join the workers' ConfigMap (imagic-gpu.json replaces the generic one).
configMapGenerator:
  - name: imagic-work-pools
    behavior: merge
    files:
      - imagic-gpu.json
      - imagic-gpu-spot.json
generatorOptions:
  disableNameSuffixHash: true  # the workers read it only to create a missing pool
"""


def kustomization(overlay: GpuOverlay) -> str:
    return KUSTOMIZATION.format(**overlay._asdict(), cloud_title=overlay.cloud.upper(), cloud_name=overlay.cloud,
                                about=CLOUDS[overlay.cloud],
                                irsa=", IRSA" if overlay.cloud == "eks" else "")


def overlay_table() -> str:
    """docs/deploy.md's "which overlay" table, from GPU_OVERLAYS."""
    rows = ["| overlay | cloud | card | GB per GPU | nodes | GPUs per node = `max_in_flight` step |",
            "|---|---|---|---|---|---|"]
    for name, o in GPU_OVERLAYS.items():
        label = f"`{o.accelerator}`" if o.cloud == "gke" else "Karpenter"
        rows.append(f"| `{name}` | {o.cloud.upper()} | {o.card} | {o.memory_gb} | `{o.machine}` ({label}) "
                    f"| {o.gpus_per_node} |")
    return "\n".join(rows) + "\n"


def render(template: dict) -> str:
    return json.dumps(template, indent=2, sort_keys=True) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    files = {K8S / "base" / "work-pools" / f"{name}.json": render(build(pool)) for name, pool in POOLS.items()}
    for name, overlay in GPU_OVERLAYS.items():
        folder = K8S / "overlays" / name
        files[folder / "kustomization.yaml"] = kustomization(overlay)
        files[folder / "imagic-gpu.json"] = render(build({**POOLS["imagic-gpu"], **placement(overlay, spot=False)}))
        files[folder / "imagic-gpu-spot.json"] = render(build({**POOLS["imagic-gpu"], **placement(overlay, spot=True)}))
    files[K8S / "overlays" / "dev" / "imagic-gpu.json"] = render(build({**POOLS["imagic-gpu"], **DEV}))
    return files


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(overlay_table(), end="")
        sys.exit()
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(REPO))
