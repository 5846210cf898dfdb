"""Runs whose process died without a word (a SIGKILLed worker, a lost node, an OOM-killed pod) stay Running
in the Prefect API for ever, and a parent waiting on one waits for ever. Prefect's answer
(https://docs.prefect.io/v3/advanced/detect-zombie-flows): flow runs send heartbeats, and an automation marks a
deployment's run Crashed when they stop. The parent then sees its chunk run end and runs the chunk again
(flows/dispatch.py); the entries it had are free once their claims' leases lapse (imagic/batch/claims.py).
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the work pools' jobs: Prefect's minimum
SILENT_S = 4 * HEARTBEAT_S  # no heartbeat for this long: the run's process is gone
AUTOMATION_NAME = "imagic: crash deployment runs that stop sending heartbeats"


def zombie_automation():
    """For each run of a deployment: after a heartbeat, another heartbeat or a final state is expected within
    SILENT_S; when none comes, the run is set Crashed. Runs outside deployments (local mode, tests) are left
    alone: they send no heartbeats this often."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=AUTOMATION_NAME,
        description="imagic-batch (flows/zombies.py): a chunk or parent run whose process died is ended, so that "
                    "its parent runs the chunk again instead of waiting for ever.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {SILENT_S} s: its process is gone")],
    )


def ensure_zombie_automation() -> None:
    """Create the automation unless the API already has one of its name (every parent in deployment mode
    calls this: the first one creates it)."""
    from prefect.automations import Automation

    try:
        Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # none of that name yet
        zombie_automation().create()
