"""The automation that ends deployment runs whose process died without a word (flows/zombies.py)."""

import pytest

from flows.zombies import AUTOMATION_NAME, HEARTBEAT_S, SILENT_S, ensure_zombie_automation, zombie_automation
from tests.deploy.test_k8s import K8S, OVERLAYS, render


def test_the_automation_crashes_only_deployment_runs_silent_for_several_heartbeats():
    automation = zombie_automation()
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive" and trigger.within.total_seconds() == SILENT_S >= 3 * HEARTBEAT_S
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match_related.root == {"prefect.resource.role": "deployment"}  # never local-mode runs
    assert [action.state.value for action in automation.actions] == ["CRASHED"]


def test_it_is_created_once_however_many_parents_ask(prefect):
    from prefect.client.orchestration import get_client

    ensure_zombie_automation()
    ensure_zombie_automation()
    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(AUTOMATION_NAME)) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flow_run_of_the_cluster_sends_heartbeats_at_the_rate_the_automation_expects(overlay):
    settings = next(o for o in render(K8S / "overlays" / overlay)
                    if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("imagic-settings"))
    assert int(settings["data"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == HEARTBEAT_S
