"""k8s/ and the work pools' job templates, validated offline against the Kubernetes API schemas (strict)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ["gke-a100", "eks-a100", "dev"]
KUBERNETES_VERSION = "1.33.0"
sys.path.insert(0, str(K8S / "base" / "work-pools"))
import build as job_templates  # noqa: E402  (k8s/base/work-pools/build.py)


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` renders (kubectl's built-in kustomize), as a cluster would get them."""
    out = subprocess.run(["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True).stdout
    return [obj for obj in yaml.safe_load_all(out) if obj]


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
            ("Deployment", "prefect-worker-cpu")} <= kinds
    assert all(o["metadata"].get("namespace") == "imagic" for o in objects if o["kind"] != "Namespace")
    workers = [o for o in objects if o["metadata"]["name"].startswith("prefect-worker-")]
    for worker in workers:
        container = worker["spec"]["template"]["spec"]["containers"][0]
        pool = worker["metadata"]["name"].removeprefix("prefect-worker-")
        assert container["args"][:6] == ["prefect", "worker", "start", "--pool", f"imagic-{pool}", "--type"]
        assert container["image"] != "imagic-batch"  # the overlay names a real image


def test_no_credentials_in_applied_manifests():
    for overlay in ("gke-a100", "eks-a100"):
        objects = render(K8S / "overlays" / overlay)
        assert not [o for o in objects if o["kind"] == "Secret"]  # created by hand (or IRSA), never committed
    template = yaml.safe_load((K8S / "base" / "secret-s3.template.yaml").read_text())
    validate(template)
    assert set(template["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(value.startswith("<") for value in template["stringData"].values())


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


def test_committed_job_templates_are_up_to_date():
    for path, template in job_templates.outputs().items():
        assert path.read_text() == job_templates.render(template), f"{path}: run python k8s/base/work-pools/build.py"


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


@pytest.mark.parametrize("overlay, selector", [
    ("gke-a100", {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}),
    ("eks-a100", {"karpenter.k8s.aws/instance-gpu-name": "a100", "karpenter.sh/capacity-type": "on-demand"}),
])
def test_gpu_job_has_gpu_placement_cache_and_settings(prefect, overlay, selector):
    image = "registry.example.com/imagic-batch:0.1.0"
    job = job_for(K8S / "overlays" / overlay / "imagic-gpu.json", {"image": image, "env": {"IMAGIC_LOG": "1"}})
    validate(job)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == selector
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "imagic-model-cache"}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": "/models"} in container["volumeMounts"]
    assert {"configMapRef": {"name": "imagic-settings"}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMAGIC_LOG"] == "1" and "PREFECT__FLOW_RUN_ID" in env
    assert container["image"] == image and job["spec"]["backoffLimit"] == 0
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to save an edit's training after SIGTERM
    assert job["metadata"]["namespace"] == "imagic" and pod["serviceAccountName"] == "imagic-flow-run"
    assert json.loads((K8S / "overlays" / overlay / "imagic-gpu.json").read_text())[
        "variables"]["properties"]["pod_watch_timeout_seconds"]["default"] >= 600  # GPU nodes scale from zero


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
        path = Path(args[args.index("--base-job-template") + 1])
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
