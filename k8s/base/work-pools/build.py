"""Write the base job templates of the `kubernetes` work pools, derived from prefect-kubernetes' own default.

    python k8s/base/work-pools/build.py        # after upgrading prefect-kubernetes, or editing a setting below

Outputs (commit them; tests check they are up to date):
  k8s/base/work-pools/imagic-gpu.json, imagic-cpu.json     generic: any cluster with the NVIDIA device plugin
  k8s/overlays/<overlay>/imagic-gpu.json              the same GPU template with that cloud's A100 defaults
The workers create their pool from these at first start (k8s/base/worker.yaml: a ConfigMap, `--base-job-template`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

K8S = Path(__file__).resolve().parents[2]
TERMINATION_GRACE_S = 120  # AWS gives spot instances 2 minutes' notice; GKE spot nodes 30 s whatever this says
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# What differs per pool: the pod's size and where it may run.
POOLS = {
    "imagic-gpu": {"gpu_count": 1, "cpu_request": "8", "memory_request": "48Gi", "memory_limit": "64Gi",
                   "node_selector": {}, "tolerations": [GPU_TOLERATION]},
    "imagic-cpu": {"gpu_count": 0, "cpu_request": "500m", "memory_request": "1Gi", "memory_limit": "2Gi",
                   "node_selector": {}, "tolerations": []},
}
OVERLAYS = {
    "gke-a100": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}},
    "eks-a100": {"node_selector": {"karpenter.k8s.aws/instance-gpu-name": "a100",
                                   "karpenter.sh/capacity-type": "on-demand"}},
    # A laptop cluster (kind, k3d, minikube) has no GPU: the same pods, on the CPU.
    "dev": {"gpu_count": 0, "cpu_request": "1", "memory_request": "2Gi", "memory_limit": "6Gi",
            "tolerations": [], "pod_watch_timeout_seconds": 300},
}


def variable(title: str, default, description: str, type_: str) -> dict:
    return {"title": title, "default": default, "description": description, "type": type_}


def build(pool: dict) -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    variables = template["variables"]["properties"]
    # Defaults for Prefect's own variables: GPU pools scale from zero, so pods may wait minutes for a node.
    defaults = {"namespace": "imagic", "image": "registry.example.com/imagic-batch:0.1.0",
                "service_account_name": "imagic-flow-run", "backoff_limit": 0, "finished_job_ttl": 3600,
                "pod_watch_timeout_seconds": pool.get("pod_watch_timeout_seconds", 900),
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
        "credentials_secret": variable("Credentials Secret", "imagic-s3",
                                       "Secret of env (S3 keys, Prefect API key); optional.", "string"),
    })

    job = template["job_configuration"]["job_manifest"]["spec"]
    pod = job["template"]["spec"]
    # prefect-kubernetes' default puts these Job fields in the pod spec, where the API server drops them
    # (and strict validation rejects them): move them where they mean something.
    for field in ("completions", "parallelism"):
        if field in pod:
            job[field] = pod.pop(field)
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}
    # After SIGTERM (a spot node reclaimed, a drain) the edit stops at its next training step and saves its
    # training for the retry (imagic/engine/checkpoints.py): time for that before the kill.
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


def outputs() -> dict[Path, dict]:
    files = {K8S / "base" / "work-pools" / f"{name}.json": build(pool) for name, pool in POOLS.items()}
    for overlay, changes in OVERLAYS.items():
        files[K8S / "overlays" / overlay / "imagic-gpu.json"] = build({**POOLS["imagic-gpu"], **changes})
    return files


def render(template: dict) -> str:
    return json.dumps(template, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    for path, template in outputs().items():
        path.write_text(render(template))
        print(path.relative_to(K8S.parent))
