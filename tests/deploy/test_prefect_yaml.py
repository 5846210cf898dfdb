"""prefect.yaml: every deployment's entrypoint imports, its parameters fit the flow, its schedule parses."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in PROJECT["deployments"]}


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_the_three_deployments_are_declared():
    assert set(DEPLOYMENTS) == {"bulk-edit", "edit-chunk", "nightly-augment"}
    assert DEPLOYMENTS["edit-chunk"]["work_pool"]["name"] == "imagic-gpu"
    assert {DEPLOYMENTS[n]["work_pool"]["name"] for n in ("bulk-edit", "nightly-augment")} == {"imagic-cpu"}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_imports_and_parameters_fit(name):
    from prefect import Flow

    deployment = DEPLOYMENTS[name]
    flow = load_flow(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    signature = inspect.signature(flow.fn)
    given = deployment.get("parameters", {})
    assert set(given) <= set(signature.parameters), set(given) - set(signature.parameters)
    signature.bind_partial(**given)
    if deployment.get("schedules"):  # a scheduled run has nobody to pass the required parameters
        required = {p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty}
        assert required <= set(given), required - set(given)


def test_the_bulk_edit_default_targets_the_declared_chunk_deployment():
    from flows.bulk_edit import EDIT_CHUNK_DEPLOYMENT

    flow = load_flow(DEPLOYMENTS["edit-chunk"]["entrypoint"])
    assert EDIT_CHUNK_DEPLOYMENT == f"{flow.name}/edit-chunk"


def test_schedules_parse():
    from prefect.client.schemas.schedules import CronSchedule

    for schedule in DEPLOYMENTS["nightly-augment"]["schedules"]:
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])


def test_the_scheduled_deployment_never_piles_up_and_runs_are_findable():
    """The nightly run has a concurrency limit; both flows name their runs from their parameters."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limit = ConcurrencyLimitConfig(**DEPLOYMENTS["nightly-augment"]["concurrency_limit"])  # what deploy sends
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    for name in ("bulk-edit", "edit-chunk"):
        flow = load_flow(DEPLOYMENTS[name]["entrypoint"])
        assert callable(flow.flow_run_name)
