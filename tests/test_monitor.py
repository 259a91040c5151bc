"""The monitor's shell against a real store (SQLite and PostgreSQL): samples in, alerts, playbook runs,
quarantines, health and notices out; tenants apart; queues bounded; replayed reports refused.

The server of these tests runs its own monitor (it follows the event log); the monitor under test here is
another one, fed samples directly as the hub would feed it, and turned by hand.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from fleetward.api import schemas
from fleetward.api import schemas_monitor as monitor_schemas
from fleetward.compose import Services
from fleetward.config import Limits
from fleetward.errors import AttestationRefused, InvalidInput
from fleetward.hub.meter import Meter
from fleetward.monitor import alerts as alert_store
from fleetward.monitor.detect import CloudSample
from fleetward.monitor.playbook_service import Destination
from fleetward.monitor.playbooks import Approval, Condition, MoveToGroup, Notify, PlaybookSpec, Quarantine
from fleetward.monitor.reports import parse_report
from fleetward.monitor.service import Monitor, SinkFactory
from fleetward.monitor.sinks import NoticeSink, RecordingSink
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice, measurement
from fleetward.wire.baseline import SecurityBaseline
from tests.conftest import AGENT, APP, TenantSetup, healthy_software, make_tenant
from tests.waiting import eventually


class RecordingSinks(SinkFactory):
    """Every destination's notices, kept."""

    def __init__(self, services: Services) -> None:
        super().__init__(services.keystore)
        self.sinks: dict[str, RecordingSink] = {}

    def sink(self, destination: Destination) -> NoticeSink:
        return self.sinks.setdefault(destination.name, RecordingSink())


def monitor_of(
    services: Services, *, limits: Limits | None = None, sinks: SinkFactory | None = None
) -> Monitor:
    """A monitor of ``services``, as the server builds one, to be turned by hand."""
    return Monitor(
        services.database,
        services.clock,
        limits or services.settings.limits,
        services.health,
        services.playbooks,
        services.keystore,
        services.trust_bell,
        sink_factory=sinks,
    )


@pytest.fixture
async def monitor(services: Services) -> AsyncIterator[Monitor]:
    async with monitor_of(services, sinks=RecordingSinks(services)) as running:
        yield running


def claimed(tenant: TenantSetup, name: str) -> SimulatedDevice:
    device = SimulatedDevice(name, healthy_software())
    tenant.claim(device)
    return device


def flood(tenant_id: str, device_id: str, at: float, *, seconds: int = 3) -> list[CloudSample]:
    """What the hub hands the monitor of a device sending 200 messages a second."""
    return [
        CloudSample(tenant_id, device_id, None, at + second, 1.0, messages_in=200, bytes_in=200 * 64)
        for second in range(seconds)
    ]


def status_of(tenant: TenantSetup, device_id: str) -> schemas.DevicePublic:
    return tenant.client.get(f"/v1/tenants/{tenant.id}/devices/{device_id}", schemas.DevicePublic)


def alerts_of(tenant: TenantSetup, **params: str | int) -> list[monitor_schemas.AlertPublic]:
    return tenant.client.get_list(f"/v1/tenants/{tenant.id}/alerts", monitor_schemas.AlertPublic, params)


def runs_of(tenant: TenantSetup) -> list[monitor_schemas.PlaybookRunPublic]:
    return tenant.client.get_list(f"/v1/tenants/{tenant.id}/playbook-runs", monitor_schemas.PlaybookRunPublic)


def add_playbook(tenant: TenantSetup, spec: PlaybookSpec) -> monitor_schemas.PlaybookPublic:
    return tenant.client.post(f"/v1/tenants/{tenant.id}/playbooks", spec, monitor_schemas.PlaybookPublic)


async def test_a_flood_opens_one_alert_that_grows_and_a_playbook_quarantines_the_device_once(
    services: Services, tenant: TenantSetup, monitor: Monitor
) -> None:
    rogue, quiet = claimed(tenant, "rogue"), claimed(tenant, "quiet")
    add_playbook(
        tenant,
        PlaybookSpec(name="flood", condition=Condition(codes=("message_flood",)), actions=(Quarantine(),)),
    )
    now = services.clock.now().timestamp()
    monitor.observe_samples(flood(tenant.id, rogue.device_id, now))
    monitor.observe_samples(
        [CloudSample(tenant.id, quiet.device_id, None, now, 1.0, messages_in=1, bytes_in=64)]
    )
    await monitor.turn()

    [alert] = alerts_of(tenant)
    assert (alert.device_id, alert.code, alert.severity) == (rogue.device_id, "message_flood", "high")
    assert alert.evidence
    assert alert.evidence[0]["metric"].startswith("messages_in")
    assert status_of(tenant, rogue.device_id).status == "quarantined"
    assert status_of(tenant, quiet.device_id).status == "active"
    [run] = runs_of(tenant)
    assert (run.state, run.device_id, [action.kind for action in run.actions]) == (
        "done",
        rogue.device_id,
        ["quarantine"],
    )
    health = tenant.client.get(
        f"/v1/tenants/{tenant.id}/devices/{rogue.device_id}/health", monitor_schemas.HealthPublic
    )
    assert (health.state, health.restricted) == ("quarantined", True)

    # it goes on: the same alert counts the repeats, and the playbook does not run again
    monitor.observe_samples(flood(tenant.id, rogue.device_id, now + 120, seconds=5))
    await monitor.turn()
    [grown] = alerts_of(tenant)
    assert grown.id == alert.id
    assert grown.count > alert.count
    assert len(runs_of(tenant)) == 1
    # and the audit log says who did what
    codes = [(event.code, event.actor) for event in tenant.events(device_id=rogue.device_id)]
    assert ("alert_opened", alert.detector) in codes
    assert ("quarantined", "playbook:flood") in codes


async def test_an_alert_of_one_tenant_never_touches_another_tenants_devices_alerts_or_playbooks(
    services: Services, admin: object, tenant: TenantSetup, monitor: Monitor
) -> None:
    other = make_tenant(tenant.client, "lab")
    mine, theirs = claimed(tenant, "mine"), claimed(other, "theirs")
    # the other tenant acts on anything at all
    add_playbook(
        other,
        PlaybookSpec(name="everything", condition=Condition(min_severity="low"), actions=(Quarantine(),)),
    )
    now = services.clock.now().timestamp()
    monitor.observe_samples(flood(tenant.id, mine.device_id, now))
    # a sample that names the other tenant with my device (no hub sends one: the tenant comes from the
    # certificate) finds no device there to act on
    monitor.observe_samples(flood(other.id, mine.device_id, now))
    await monitor.turn()

    assert [alert.device_id for alert in alerts_of(tenant)] == [mine.device_id]
    assert status_of(tenant, mine.device_id).status == "active"  # my tenant has no playbook
    assert status_of(other, theirs.device_id).status == "active"
    [run] = runs_of(other)
    assert run.state == "failed"  # the other tenant's playbook could not reach a device not in its tenant
    assert "not" in run.actions[0].detail


async def test_a_playbook_naming_another_tenants_group_is_refused(
    services: Services, tenant: TenantSetup
) -> None:
    other = make_tenant(tenant.client, "lab")
    foreign_group = other.groups["Field Test"].id
    with pytest.raises(Exception, match=r"no such|not found"):
        add_playbook(
            tenant,
            PlaybookSpec(name="steal", actions=(MoveToGroup(group_id=foreign_group), Quarantine())),
        )
    assert tenant.client.get_list(f"/v1/tenants/{tenant.id}/playbooks", monitor_schemas.PlaybookPublic) == []


async def test_a_playbook_awaiting_approval_acts_only_once_approved_and_undoing_it_restores_the_device(
    services: Services, tenant: TenantSetup, monitor: Monitor
) -> None:
    device = claimed(tenant, "panel")
    quarantine_group = tenant.groups["Development"].id
    add_playbook(
        tenant,
        PlaybookSpec(
            name="ask first",
            condition=Condition(codes=("message_flood",)),
            actions=(MoveToGroup(group_id=quarantine_group), Quarantine()),
            approval=Approval.OPERATOR,
        ),
    )
    monitor.observe_samples(flood(tenant.id, device.device_id, services.clock.now().timestamp()))
    await monitor.turn()
    [run] = runs_of(tenant)
    assert run.state == "awaiting_approval"
    assert status_of(tenant, device.device_id).status == "active"

    path = f"/v1/tenants/{tenant.id}/playbook-runs/{run.id}"
    approved = monitor_schemas.PlaybookRunPublic.model_validate_json(
        tenant.client.request("POST", f"{path}/approve").content
    )
    assert approved.state == "done"
    assert approved.decided_by == "admin@example.com"
    moved = status_of(tenant, device.device_id)
    assert (moved.status, moved.group_id) == ("quarantined", quarantine_group)
    # approving twice is refused
    with pytest.raises(Exception, match="not awaiting"):
        tenant.client.request("POST", f"{path}/approve")

    undone = monitor_schemas.PlaybookRunPublic.model_validate_json(
        tenant.client.request("POST", f"{path}/undo").content
    )
    assert undone.state == "undone"
    back = status_of(tenant, device.device_id)
    assert (back.status, back.group_id) == ("active", tenant.groups["Field Test"].id)
    assert alerts_of(tenant) == []  # its alerts were closed with the undo
    assert [alert.state for alert in alerts_of(tenant, state="closed")] == ["closed"]


async def test_a_notify_action_sends_the_alert_to_its_destination_with_a_stable_id(
    services: Services, tenant: TenantSetup, monitor: Monitor
) -> None:
    device = claimed(tenant, "panel")
    created = tenant.client.post(
        f"/v1/tenants/{tenant.id}/notice-destinations",
        monitor_schemas.DestinationCreate(name="soc", kind="webhook", target="https://soc.example.com/hook"),
        monitor_schemas.DestinationPublic,
    )
    assert created.secret is not None
    assert len(bytes.fromhex(created.secret)) == 32
    listed = tenant.client.get_list(
        f"/v1/tenants/{tenant.id}/notice-destinations", monitor_schemas.DestinationPublic
    )
    assert [item.secret for item in listed] == [None]  # shown once, never again
    [added] = [event for event in tenant.events(kind="playbook") if event.code == "destination_added"]
    assert (
        added.detail == "webhook destination 'soc' → https://soc.example.com"
    )  # no path: it may hold a token
    add_playbook(
        tenant, PlaybookSpec(name="tell", condition=Condition(), actions=(Notify(destination="soc"),))
    )
    monitor.observe_samples(flood(tenant.id, device.device_id, services.clock.now().timestamp()))
    await monitor.turn()
    sinks = monitor._sink_factory
    assert isinstance(sinks, RecordingSinks)
    recorded = sinks.sinks["soc"]
    await eventually(lambda: asyncio.sleep(0, result=recorded.notices), what="the notice")
    [notice] = recorded.notices
    [alert] = alerts_of(tenant)
    assert (notice.id, notice.device_id, notice.code, notice.severity) == (
        f"alert-{alert.id}",
        device.device_id,
        "message_flood",
        "high",
    )
    assert status_of(tenant, device.device_id).status == "active"  # notify only


@pytest.mark.parametrize(
    "target", ["http://soc.example.com/hook", "ftp://x", "https://user:pw@soc.example.com/"]
)
def test_a_webhook_destination_that_would_leak_is_refused(tenant: TenantSetup, target: str) -> None:
    with pytest.raises(Exception, match="webhook"):
        tenant.client.post(
            f"/v1/tenants/{tenant.id}/notice-destinations",
            monitor_schemas.DestinationCreate(name="bad", kind="webhook", target=target),
            monitor_schemas.DestinationPublic,
        )


async def test_a_flood_of_samples_is_bounded_and_counted_not_queued_without_end(
    services: Services, tenant: TenantSetup
) -> None:
    limits = services.settings.limits
    bounded = monitor_of(services, limits=type(limits)(monitor_queue_max=100))
    now = services.clock.now().timestamp()
    bounded.observe_samples(
        [CloudSample(tenant.id, f"{n:064x}", None, now, 1.0, messages_in=1) for n in range(150)]
    )
    bounded.observe_samples(
        [CloudSample(tenant.id, f"{n:064x}", None, now, 1.0, messages_in=1) for n in range(10)]
    )
    assert bounded.stats.dropped == 60
    await bounded.turn()
    assert bounded.stats.samples == 100


def test_the_meter_counts_per_device_forgets_idle_devices_and_never_grows_past_its_bound() -> None:
    meter = Meter(max_devices=2)
    first = meter.counters("t", "a")
    first.live += 1
    first.received(10)
    first.attempted("10.0.0.1")
    meter.counters("t", "b").refused()
    spare = meter.counters("t", "c")  # over the bound: counted nowhere
    spare.received(1_000_000)
    assert meter.overflow == 1
    samples = {sample.device_id: sample for sample in meter.collect(100.0, 1.0)}
    assert samples.keys() == {"a", "b"}
    assert (samples["a"].messages_in, samples["a"].bytes_in, samples["a"].source_addresses) == (
        1,
        10,
        frozenset({"10.0.0.1"}),
    )
    assert samples["b"].authorization_failures == 1
    for _ in range(6):
        assert meter.collect(101.0, 1.0) == []  # nothing new: no samples
    assert len(meter) == 1  # b, idle and without a session, is forgotten; a has a live session


def test_a_replayed_or_future_security_baseline_is_refused(services: Services, tenant: TenantSetup) -> None:
    device = claimed(tenant, "panel")
    now = services.clock.now()

    def baseline(at: dt.datetime) -> bytes:
        return SecurityBaseline(collected_at=at, interval_seconds=60).model_dump_json().encode()

    services.reports.record(tenant.id, device.device_id, parse_report("security-baseline", baseline(now)))
    with pytest.raises(InvalidInput) as replayed:
        services.reports.record(tenant.id, device.device_id, parse_report("security-baseline", baseline(now)))
    assert replayed.value.code == "report_replayed"
    with pytest.raises(InvalidInput) as older:
        services.reports.record(
            tenant.id,
            device.device_id,
            parse_report("security-baseline", baseline(now - dt.timedelta(minutes=1))),
        )
    assert older.value.code == "report_replayed"
    with pytest.raises(InvalidInput) as future:
        services.reports.record(
            tenant.id,
            device.device_id,
            parse_report("security-baseline", baseline(now + dt.timedelta(hours=1))),
        )
    assert future.value.code == "report_from_future"
    services.reports.record(
        tenant.id,
        device.device_id,
        parse_report("security-baseline", baseline(now + dt.timedelta(minutes=1))),
    )


async def test_a_tenants_own_detection_rules_are_validated_kept_and_used_after_a_restart(
    services: Services, tenant: TenantSetup
) -> None:
    path = f"/v1/tenants/{tenant.id}/detection-rules"
    assert tenant.client.get(path, monitor_schemas.DetectionRules).rules == []
    rule = {
        "name": "chatty",
        "metric": "messages_in",
        "statistic": "sum",
        "window_seconds": 10,
        "comparator": ">=",
        "threshold": 20,
        "severity": "medium",
        "code": "chatty",
    }
    kept = tenant.client.put(
        path, monitor_schemas.DetectionRules(rules=[rule]), monitor_schemas.DetectionRules
    )
    assert [item["name"] for item in kept.rules] == ["chatty"]
    with pytest.raises(Exception, match="window is 1 to 86400 seconds"):
        tenant.client.put(
            path,
            monitor_schemas.DetectionRules(rules=[{**rule, "window_seconds": -1}]),
            monitor_schemas.DetectionRules,
        )
    async with monitor_of(services) as restarted:
        assert [item.name for item in restarted.detector.rules(tenant.id)] == ["chatty"]
    tenant.client.put(path, monitor_schemas.DetectionRules(rules=[]), monitor_schemas.DetectionRules)
    assert tenant.client.get(path, monitor_schemas.DetectionRules).rules == []


async def test_what_the_baselines_learned_of_a_device_outlives_a_restart(
    services: Services, tenant: TenantSetup, monitor: Monitor
) -> None:
    device = claimed(tenant, "panel")
    now = services.clock.now().timestamp()
    monitor.observe_samples(
        [
            CloudSample(tenant.id, device.device_id, None, now + second, 1.0, messages_in=1)
            for second in range(30)
        ]
    )
    await monitor.turn()
    learned = monitor.detector.snapshot_device(tenant.id, device.device_id)
    assert learned is not None
    assert monitor.save_learned() == 1
    async with monitor_of(services) as restarted:
        assert restarted.detector.snapshot_device(tenant.id, device.device_id) is None
        restarted.observe_samples(
            [CloudSample(tenant.id, device.device_id, None, now + 31, 1.0, messages_in=1)]
        )
        await restarted.turn()  # the device is new to this process: what was learned is taken up
        assert restarted.detector.snapshot_device(tenant.id, device.device_id) is not None
        resumed = restarted.detector.snapshot_device(tenant.id, device.device_id)
    assert resumed is not None
    # the buckets learned before the restart came back (a fresh start would have learned none yet)
    assert json.loads(resumed)["learned"] >= json.loads(learned)["learned"] > 0


@pytest.mark.parametrize(
    "forged",
    [
        # a report names no device: it is about the device whose certificate sent it
        {"collected_at": "2026-12-02T07:00:00Z", "interval_seconds": 60, "device_id": "someone-else"},
        {"collected_at": "2026-12-02T07:00:00Z", "interval_seconds": 60, "tenant_id": "another-tenant"},
        {"collected_at": "2026-12-02T07:00:00Z", "interval_seconds": -1},
        {"collected_at": "not a time", "interval_seconds": 60},
    ],
)
def test_a_forged_security_baseline_is_refused_saying_what_is_wrong(forged: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_report("security-baseline", json.dumps(forged).encode())
    assert refused.value.code == "report_malformed"


async def test_a_refused_attestation_of_tampered_software_is_a_critical_alert_that_restricts_the_device(
    services: Services, server: BackgroundServer, tenant: TenantSetup, monitor: Monitor
) -> None:
    honest = claimed(tenant, "honest")
    tampered = SimulatedDevice("tampered", (measurement(*AGENT), measurement(*APP, tampered=True)))
    tenant.claim(tampered)
    async with httpx.AsyncClient(timeout=30) as http:
        await honest.enroll(server.url, http)
        with pytest.raises(AttestationRefused) as refused:
            await tampered.enroll(server.url, http)
    assert refused.value.code == "measurement_unknown"
    await monitor.turn()  # the monitor follows the event log: the refusal is there

    [alert] = alerts_of(tenant)
    assert (alert.device_id, alert.code, alert.severity, alert.detector) == (
        tampered.device_id,
        "attestation_refused",
        "critical",
        "attestation",
    )
    health = tenant.client.get(
        f"/v1/tenants/{tenant.id}/devices/{tampered.device_id}/health", monitor_schemas.HealthPublic
    )
    assert (health.state, health.restricted) == ("unhealthy", True)
    assert {reason.code for reason in health.reasons} >= {"attestation_failed", "alert:attestation_refused"}
    # a device that attested well is judged healthy, and nothing of the other touches it
    fine = tenant.client.get(
        f"/v1/tenants/{tenant.id}/devices/{honest.device_id}/health",
        monitor_schemas.HealthPublic,
        {"refresh": "true"},
    )
    assert (fine.state, fine.restricted) == ("healthy", False)


async def test_repeats_of_the_alert_a_device_was_set_aside_for_do_not_hold_back_its_release(
    services: Services, tenant: TenantSetup, monitor: Monitor
) -> None:
    device = claimed(tenant, "rogue")
    add_playbook(
        tenant,
        PlaybookSpec(name="flood", condition=Condition(codes=("message_flood",)), actions=(Quarantine(),)),
    )
    now = services.clock.now().timestamp()
    monitor.observe_samples(flood(tenant.id, device.device_id, now))
    await monitor.turn()
    [run] = runs_of(tenant)
    assert run.decided_at is not None
    # what was in flight when its session ended arrives after the run: the same incident, repeated
    monitor.observe_samples(flood(tenant.id, device.device_id, run.decided_at.timestamp() + 120, seconds=5))
    await monitor.turn()
    [alert] = alerts_of(tenant)
    assert alert.last_seen_at > run.decided_at
    with services.database.read() as connection:
        assert (
            alert_store.raised_since(connection, tenant.id, device.device_id, run.decided_at, run.alert_id)
            == []
        )
        # any other alert since counts
        assert alert_store.raised_since(connection, tenant.id, device.device_id, run.decided_at) == ["high"]
