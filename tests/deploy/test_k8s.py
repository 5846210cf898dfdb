"""k8s/ and the work pools' job templates, validated offline against the Kubernetes API schemas (strict)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.33.0"
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
sys.path.insert(0, str(K8S / "base" / "work-pools"))
import build as job_templates  # noqa: E402  (k8s/base/work-pools/build.py)

GPU_OVERLAYS = sorted(job_templates.GPU_OVERLAYS)
OVERLAYS = [*GPU_OVERLAYS, "dev"]
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
KARPENTER = "karpenter.k8s.aws/instance-gpu-"
# Written out, not derived from build.py: what each overlay must select, as the clouds label their nodes.
NODE_SELECTORS = {
    "gke-a100": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},  # the 40 GB A100
    "gke-a100-80gb": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
    "gke-h100": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    "eks-a100": {KARPENTER + "name": "a100", KARPENTER + "memory": "40960", KARPENTER + "count": "8"},  # p4d
    "eks-a100-80gb": {KARPENTER + "name": "a100", KARPENTER + "memory": "81920", KARPENTER + "count": "8"},  # p4de
    "eks-h100": {KARPENTER + "name": "h100", KARPENTER + "memory": "81920", KARPENTER + "count": "8"},  # p5.48xlarge
}
SPOT = {"gke": ({"cloud.google.com/gke-spot": "true"},
                {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}),
        "eks": ({"karpenter.sh/capacity-type": "spot"},
                {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot", "effect": "NoSchedule"})}
ON_DEMAND = {"gke": {}, "eks": {"karpenter.sh/capacity-type": "on-demand"}}


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` renders (kubectl's built-in kustomize), as a cluster would get them."""
    out = subprocess.run(["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True).stdout
    return [obj for obj in yaml.safe_load_all(out) if obj]


def render_with_spot(overlay: str, tmp_path: Path) -> list[dict]:
    """An overlay with k8s/components/spot added, the way docs/deploy.md tells users to combine them."""
    def relative(path: Path) -> str:
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [relative(K8S / "overlays" / overlay)], "components": [relative(K8S / "components" / "spot")]}))
    return render(tmp_path)


def worker_container(objects: list[dict], pool: str) -> dict:
    [worker] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == f"prefect-worker-{pool}"]
    return worker["spec"]["template"]["spec"]["containers"][0]


def template_path(container: dict) -> Path:
    """The --base-job-template a worker starts with, its $(VAR) expanded as the kubelet does."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = container["args"][container["args"].index("--base-job-template") + 1]
    return Path(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], path))


def validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_is_valid(overlay):
    objects = render(K8S / "overlays" / overlay)
    for obj in objects:
        validate(obj)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Namespace", "imagic"), ("Role", "imagic-worker"), ("RoleBinding", "imagic-worker"),
            ("ServiceAccount", "imagic-worker"), ("ConfigMap", "imagic-settings"),
            ("PersistentVolumeClaim", "imagic-model-cache"), ("Deployment", "prefect-worker-gpu"),
            ("Deployment", "prefect-worker-cpu"), ("PriorityClass", "imagic-gpu")} <= kinds
    assert all(o["metadata"].get("namespace") == "imagic" for o in objects if o["kind"] not in CLUSTER_SCOPED)
    assert all("namespace" not in o["metadata"] for o in objects if o["kind"] in CLUSTER_SCOPED)
    workers = [o for o in objects if o["metadata"]["name"].startswith("prefect-worker-")]
    for worker in workers:
        container = worker["spec"]["template"]["spec"]["containers"][0]
        pool = worker["metadata"]["name"].removeprefix("prefect-worker-")
        assert container["args"][:6] == ["prefect", "worker", "start", "--pool", f"imagic-{pool}", "--type"]
        assert container["image"] != "imagic-batch"  # the overlay names a real image


def test_every_overlay_folder_is_in_the_table_and_renders_from_generated_files():
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted(OVERLAYS)
    generated = job_templates.outputs()
    for overlay in GPU_OVERLAYS:
        assert {p.name for p in (K8S / "overlays" / overlay).iterdir()} == {
            p.name for p in generated if p.parent.name == overlay}


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_the_spot_component_combines_with_every_gpu_overlay(overlay, tmp_path):
    objects = render_with_spot(overlay, tmp_path)
    for obj in objects:
        validate(obj)
    container = worker_container(objects, "gpu")
    path = template_path(container)
    assert path.name == "imagic-gpu-spot.json"
    [templates] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "imagic-work-pools"]
    assert templates["data"][path.name] == (K8S / "overlays" / overlay / path.name).read_text()
    # the patch adds to the worker's env, it does not replace it
    assert {e["name"] for e in container["env"]} == {e["name"] for e in worker_container(
        render(K8S / "overlays" / overlay), "gpu")["env"]}
    assert template_path(worker_container(objects, "cpu")).name == "imagic-cpu.json"


def test_no_credentials_in_applied_manifests():
    for overlay in GPU_OVERLAYS:
        objects = render(K8S / "overlays" / overlay)
        assert not [o for o in objects if o["kind"] == "Secret"]  # created by hand (or IRSA), never committed
    keys = {"secret-worker.template.yaml": ("imagic-worker", {"PREFECT_API_KEY"}),
            "secret-job.template.yaml": ("imagic-job", {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"})}
    for name, (secret, expected) in keys.items():
        template = yaml.safe_load((K8S / "base" / name).read_text())
        validate(template)
        assert template["metadata"]["name"] == secret and set(template["stringData"]) == expected
        assert all(value.startswith("<") for value in template["stringData"].values())


def secret_names(container: dict) -> set[str]:
    """Every Secret a container's environment reads."""
    names = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return names | {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_get_the_prefect_key_only_and_job_pods_the_s3_keys(overlay):
    objects = render(K8S / "overlays" / overlay)
    for pool in ("gpu", "cpu"):
        container = worker_container(objects, pool)
        assert secret_names(container) == {"imagic-worker"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        # the worker hands job pods the API key as a secretKeyRef to that Secret, never the key itself
        assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME"] == "imagic-worker"
        assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_KEY"] == "PREFECT_API_KEY"
    [templates] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "imagic-work-pools"]
    for text in templates["data"].values():
        template = json.loads(text)
        assert template["variables"]["properties"]["credentials_secret"]["default"] == "imagic-job"
        container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "{{ credentials_secret }}", "optional": True}} in container["envFrom"]
    # dev's MinIO credentials are the job pods' S3 keys
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert overlay == "dev" and secret["metadata"]["name"] == "imagic-job"


def test_the_worker_role_is_namespaced_and_covers_what_the_worker_does():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "base")}
    rules = objects[("Role", "imagic-worker")]["rules"]
    allowed = {(group, resource, verb) for r in rules for group in r["apiGroups"] for resource in r["resources"]
               for verb in r["verbs"]}
    assert {("batch", "jobs", "create"), ("batch", "jobs", "watch"), ("batch", "jobs", "delete"),
            ("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "watch")} <= allowed
    assert not [k for k in objects if k[0].startswith("Cluster")]
    settings = objects[("ConfigMap", "imagic-settings")]["data"]
    assert settings["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "imagic"  # so a Role suffices


def test_committed_job_templates_and_overlays_are_up_to_date():
    for path, text in job_templates.outputs().items():
        assert path.is_file() and path.read_text() == text, f"{path}: run python k8s/base/work-pools/build.py"


def job_for(template_file: Path, job_variables: dict) -> dict:
    """The Job a kubernetes worker would submit for a flow run of a deployment on this pool."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(template_file.read_text())
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="crafty-koala"))
    return configuration.job_manifest


@pytest.mark.parametrize("spot", [False, True], ids=["on-demand", "spot"])
@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_job_has_gpu_placement_cache_and_settings(prefect, overlay, spot):
    image = "registry.example.com/imagic-batch:0.1.0"
    cloud = overlay.split("-")[0]
    file = K8S / "overlays" / overlay / ("imagic-gpu-spot.json" if spot else "imagic-gpu.json")
    job = job_for(file, {"image": image, "env": {"IMAGIC_LOG": "1"}})
    validate(job)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    spot_selector, spot_toleration = SPOT[cloud]
    assert pod["nodeSelector"] == {**NODE_SELECTORS[overlay], **(spot_selector if spot else ON_DEMAND[cloud])}
    assert GPU_TAINT in pod["tolerations"] and (spot_toleration in pod["tolerations"]) == spot
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "imagic-model-cache"}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": "/models"} in container["volumeMounts"]
    assert {"configMapRef": {"name": "imagic-settings"}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMAGIC_LOG"] == "1" and "PREFECT__FLOW_RUN_ID" in env
    assert container["image"] == image and job["spec"]["backoffLimit"] == 0
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to save an edit's training after SIGTERM
    assert job["metadata"]["namespace"] == "imagic" and pod["serviceAccountName"] == "imagic-flow-run"
    assert json.loads(file.read_text())[
        "variables"]["properties"]["pod_watch_timeout_seconds"]["default"] >= 600  # GPU nodes scale from zero


def test_the_table_names_the_cards_and_nodes_users_run():
    table = job_templates.GPU_OVERLAYS
    assert set(table) == set(NODE_SELECTORS)
    assert {n: (o.card, o.memory_gb, o.machine) for n, o in table.items() if n.startswith("eks-")} == {
        "eks-a100": ("A100", 40, "p4d.24xlarge"), "eks-a100-80gb": ("A100", 80, "p4de.24xlarge"),
        "eks-h100": ("H100", 80, "p5.48xlarge")}
    for name, overlay in table.items():
        assert overlay.cloud == name.split("-")[0] and overlay.gpus_per_node == 8
        assert name.endswith("-80gb") == (overlay.card == "A100" and overlay.memory_gb == 80)
        kustomization = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
        assert kustomization["components"] == [f"../../components/{overlay.cloud}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_jobs_have_a_deadline_that_fits_a_chunk_and_an_existing_priority_class(prefect, overlay):
    objects = render(K8S / "overlays" / overlay)
    classes = {o["metadata"]["name"] for o in objects if o["kind"] == "PriorityClass"}
    settings = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "imagic-settings")
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [bulk_edit] = [d for d in project["deployments"] if d["name"] == "bulk-edit"]
    files = [K8S / "overlays" / overlay / name for name in ("imagic-gpu.json", "imagic-gpu-spot.json")]
    for file in [f for f in files if f.is_file()] + [K8S / "base" / "work-pools" / "imagic-gpu.json"]:
        template = json.loads(file.read_text())["variables"]["properties"]
        job = job_for(file, {"image": "img:1"})
        validate(job)
        deadline = job["spec"]["activeDeadlineSeconds"]
        # the clock runs from the Job's creation: the wait for a node, then every entry of a chunk at its limit
        assert deadline >= (bulk_edit["parameters"]["chunk_size"] * float(settings["data"]["IMAGIC_ENTRY_TIMEOUT_S"])
                            + template["pod_watch_timeout_seconds"]["default"])
        assert job["spec"]["template"]["spec"]["priorityClassName"] in classes
    assert "activeDeadlineSeconds" not in job_for(K8S / "base" / "work-pools" / "imagic-cpu.json",
                                                  {"image": "img:1"})["spec"]  # the parent lives as long as its batch


def test_max_in_flight_fills_whole_nodes():
    """An 8-GPU node with 4 chunks in flight is paid for 8 GPUs and uses 4."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        if "max_in_flight" in deployment.get("parameters", {}):
            for overlay in job_templates.GPU_OVERLAYS.values():
                assert deployment["parameters"]["max_in_flight"] % overlay.gpus_per_node == 0, deployment["name"]


def test_the_guide_shows_the_overlay_table():
    assert job_templates.overlay_table() in (REPO / "docs" / "deploy.md").read_text(), (
        "paste `python k8s/base/work-pools/build.py --table` into docs/deploy.md")


def test_docs_and_config_name_models_that_are_on_the_hub():
    """stabilityai/stable-diffusion-2-1(-base) and runwayml/stable-diffusion-v1-5 were taken off the hub."""
    files = [REPO / "README.md", REPO / "prefect.yaml", *sorted((REPO / "docs").rglob("*.md")),
             *sorted(K8S.rglob("*.yaml")), *sorted((REPO / "examples").glob("*.jsonl"))]
    for path in files:
        text = path.read_text()
        assert "stable-diffusion-2-1" not in text and "runwayml/" not in text, path
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        model = deployment.get("parameters", {}).get("model")
        if model and "/" in model and not model.startswith("s3://"):  # a hub id: pinned to a commit
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", model), model


def test_job_variables_override_the_template(prefect):
    job = job_for(K8S / "base" / "work-pools" / "imagic-gpu.json",
                  {"image": "img:1", "gpu_count": 2, "node_selector": {"pool": "a100-80gb"},
                   "tolerations": [], "memory_limit": "120Gi"})
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "120Gi"}
    assert pod["nodeSelector"] == {"pool": "a100-80gb"} and pod["tolerations"] == []


def test_cpu_pool_job_asks_for_no_gpu(prefect):
    job = job_for(K8S / "base" / "work-pools" / "imagic-cpu.json", {"image": "img:1"})
    validate(job)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_creates_its_pool_from_the_projects_template(overlay):
    """A kubernetes worker creates a missing pool; started before the pool existed, it once got Prefect's
    default template and the guide's `work-pool create` then failed. Now the template travels with it."""
    objects = render(K8S / "overlays" / overlay)
    [templates] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "imagic-work-pools"]
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in project["deployments"]}
    workers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for pool in pools:
        pod = workers[f"prefect-worker-{pool.removeprefix('imagic-')}"]["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        path = template_path(pod["containers"][0])
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent)]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == "imagic-work-pools" and args[args.index("--pool") + 1] == pool
        own = K8S / "overlays" / overlay / f"{pool}.json"
        expected = own if own.is_file() else K8S / "base" / "work-pools" / f"{pool}.json"
        assert templates["data"][path.name] == expected.read_text()


@pytest.mark.parametrize("template", sorted(K8S.glob("**/imagic-*.json")), ids=lambda p: str(p.relative_to(K8S)))
def test_a_prefect_server_accepts_each_template_as_a_work_pool(prefect, template):
    """What `prefect work-pool create NAME --type kubernetes --base-job-template FILE` sends."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    name = "pool-" + str(template.relative_to(K8S)).replace("/", "-").removesuffix(".json")
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes",
                                                      base_job_template=json.loads(template.read_text())))
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["type"] == "integer"


def test_yaml_is_lint_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(REPO / ".yamllint.yaml"))
    files = sorted(K8S.rglob("*.yaml")) + [REPO / "prefect.yaml", REPO / ".yamllint.yaml"]
    problems = [f"{path.relative_to(REPO)}:{p.line}: {p.message}" for path in files
                for p in linter.run(path.read_text(), config, str(path))]
    assert len(files) > 10 and not problems, "\n".join(problems)
