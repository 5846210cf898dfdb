"""Submit a batch and leave: the `bulk-edit` parent runs on the work pool (a CPU pod), not in the caller's
process; its progress is read back from the Prefect API."""

from __future__ import annotations

import time
from collections.abc import Callable

BULK_EDIT_DEPLOYMENT = "bulk-edit/bulk-edit"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def submit_batch(parameters: dict, deployment: str = BULK_EDIT_DEPLOYMENT):
    """Create the parent's flow run on its deployment and return it at once (`timeout=0`: no waiting)."""
    from prefect.deployments import run_deployment

    from flows.dispatch import check_deployment
    from flows.zombies import ensure_zombie_automation

    check_deployment(deployment)
    ensure_zombie_automation()  # a parent whose pod dies is ended too, and `status --follow` says so
    return run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)


def ui_link(flow_run_id) -> str | None:
    """The flow run's page in the Prefect UI, where one is configured."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def latest_run(output_uri: str, deployment: str = BULK_EDIT_DEPLOYMENT):
    """The newest parent run of a batch written into `output_uri`, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment.split("/")[-1]])), sort=FlowRunSort.START_TIME_DESC, limit=200)
    return next((run for run in runs if run.parameters.get("output_uri") == output_uri), None)


def run_status(flow_run_id) -> dict:
    """State, message and progress (the parent's progress artifact, percent) of a parent run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["progress"])))
    progress = max((a.data for a in artifacts if isinstance(a.data, int | float)), default=None)
    state = run.state
    return {"flow_run_id": str(run.id), "name": run.name, "state": state.type.value if state else None,
            "message": state.message if state else None, "progress_percent": progress,
            "output_uri": run.parameters.get("output_uri")}


def follow(flow_run_id, on_update: Callable[[dict], None], interval_s: float = 2.0,
           timeout_s: float | None = None) -> dict:
    """Poll the run until it ends (or `timeout_s` passes), calling `on_update` whenever what it says changes."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = run_status(flow_run_id)
        if status != last:
            on_update(status)
            last = status
        if status["state"] in FINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(interval_s)
