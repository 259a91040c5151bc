"""The device's updater: what it does with a plan, and what the director hears about it.

The update client is replaced by a fake behind :class:`~fleetward.agent.updater.Client` (the real client
is tested against the real python-tuf client in tests/test_update_client.py, and end to end with the real
server in tests/test_updates_end_to_end.py); the slots are real, and the applications are launched by real
measured launch.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from fleetward.agent.app_services import SystemEvent, SystemEventKind
from fleetward.agent.config import read_install_record, render_install_record, write_private_file
from fleetward.agent.launch import InstallRecord
from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.agent.self_update import (
    AGENT_COMPONENT_ID,
    AGENT_DID_NOT_START,
    AGENT_ENTRY_POINT,
    agent_record_dir,
    agent_slots,
)
from fleetward.agent.slots import ComponentSlots
from fleetward.agent.update_client import Downloaded, Plan, PlannedImage
from fleetward.agent.updater import Client, Updater, UpdaterSettings
from fleetward.clock import FakeClock
from fleetward.errors import LaunchRefused, TransportError, UpdateRefused
from fleetward.wire.updates import (
    ImageKind,
    MaintenanceWindow,
    TargetCustom,
    UpdateState,
    VersionReport,
    target_path,
)
from tests.agent_apps import COMPONENT, AppWorld, manifest_for, reachable_directory, script

PRODUCT = "5b0f6f7e-0000-4000-8000-000000000001"
DEPLOYMENT = "d-1"
NOON = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class FakeClient:
    """Hands out a fixed plan and the bytes of its images; records reports (or fails to send them)."""

    plan: Plan
    blobs: dict[str, bytes]
    reports: list[VersionReport] = field(default_factory=list)
    refuse_download: UpdateRefused | None = None
    cut: TransportError | None = None
    offline: bool = False
    downloads: int = 0

    def check(self, installed: Mapping[str, tuple[str, str]]) -> Plan:
        return self.plan

    def download(self, image: PlannedImage, partial: Path, have: Path | None) -> Downloaded:
        self.downloads += 1
        if self.refuse_download is not None:
            raise self.refuse_download
        if self.cut is not None:
            raise self.cut
        data = self.blobs[image.sha256]
        partial.write_bytes(data)
        return Downloaded(partial, len(data), 0, via_delta=False)

    def report(self, report: VersionReport) -> None:
        if self.offline:
            raise TransportError("the network is down")
        self.reports.append(report)


@dataclass
class Apps:
    """The agent's side: measured launch of what the updater switched to, and a trial verdict."""

    world: AppWorld
    verdict: str | None = None
    running: dict[str, str] = field(default_factory=dict)
    deferred: dt.datetime | None = None
    deferral_reset: int = 0
    restarts: int = 0
    events: list[SystemEvent] = field(default_factory=list)
    #: what the application does when told of its update: defer until then
    defer_when_told: dt.datetime | None = None

    async def replace(self, record: InstallRecord | None, component_id: str) -> None:
        self.running.pop(component_id, None)
        if record is not None:
            launched = await self.world.launcher().launch(record)
            self.running[component_id] = launched.record.version

    async def trial(self, component_id: str, seconds: float) -> str | None:
        return self.verdict

    def deferred_until(self, component_id: str) -> dt.datetime | None:
        return self.deferred

    def deferral_done(self, component_id: str) -> None:
        self.deferral_reset += 1

    def restart_agent(self) -> None:
        self.restarts += 1

    def announce(self, event: SystemEvent) -> None:
        self.events.append(event)
        if event.kind is SystemEventKind.UPDATE_PENDING and self.defer_when_told is not None:
            self.deferred = self.defer_when_told


@dataclass
class Device:
    world: AppWorld
    clock: FakeClock

    @property
    def state_dir(self) -> Path:
        return self.world.base / "state"

    @property
    def apps_dir(self) -> Path:
        return self.state_dir / "apps"

    def package(self, version: str, *, crash: bool = False) -> tuple[bytes, bytes]:
        body = "raise SystemExit(3)" if crash else f"print('version {version}')"
        data = build_package(manifest_for(COMPONENT), {"bin/app": script(body, own_user=False)})
        return data, sign_package(self.world.publisher, data)

    def install(self, version: str) -> None:
        """What `fleetward agent app install` leaves: a package outside the slots and its record."""
        data, signature = self.package(version)
        digest = hashlib.sha256(data).hexdigest()
        package = self.state_dir / "packages" / f"{digest}.tar"
        write_private_file(package, data)
        write_private_file(package.with_name(package.name + ".sig"), signature)
        record = InstallRecord(COMPONENT, version, digest, package, package.with_name(package.name + ".sig"))
        write_private_file(self.apps_dir / f"{COMPONENT}.toml", render_install_record(record, self.state_dir))

    def installed_version(self) -> str:
        return read_install_record(self.apps_dir / f"{COMPONENT}.toml").version

    def planned(self, version: str, data: bytes, signature: bytes) -> PlannedImage:
        path = target_path(PRODUCT, COMPONENT, version)
        custom = TargetCustom(
            component_id=COMPONENT,
            version=version,
            product_id=PRODUCT,
            publisher_signature=base64.b64encode(signature).decode(),
        )
        target = TargetFile.from_data(path, data)
        target.unrecognized_fields["custom"] = custom.model_dump(mode="json", exclude_none=True)
        return PlannedImage(COMPONENT, version, ImageKind.APP, target, custom)

    def updater(self, client: Client, apps: Apps, *, agent_sha256: str | None = None) -> Updater:
        settings = UpdaterSettings(
            state_dir=self.state_dir, apps_dir=self.apps_dir, trial_seconds=0.1, agent_sha256=agent_sha256
        )
        return Updater(settings, client, apps, clock=self.clock)


@pytest.fixture
def device() -> Iterator[Device]:
    with reachable_directory() as base:
        world = AppWorld(base)
        result = Device(world, FakeClock(NOON))
        result.install("1.0.0")
        yield result


def plan_for(
    device: Device, version: str, *, crash: bool = False, window: MaintenanceWindow | None = None
) -> FakeClient:
    data, signature = device.package(version, crash=crash)
    image = device.planned(version, data, signature)
    plan = Plan(assignment_version=1, deployment_id=DEPLOYMENT, window=window, images=(image,))
    return FakeClient(plan, {image.sha256: data})


def last_state(client: FakeClient) -> list[tuple[str, UpdateState, str | None]]:
    return [(result.version, result.state, result.code) for result in client.reports[-1].results]


async def test_an_image_that_stays_up_is_kept_and_reported_installed(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    apps = Apps(device.world)
    await device.updater(client, apps).check_once()
    assert device.installed_version() == "2.0.0"
    assert apps.running == {COMPONENT: "2.0.0"}
    assert apps.deferral_reset == 1  # the application's deferral budget starts afresh
    assert last_state(client) == [("2.0.0", UpdateState.INSTALLED, None)]
    assert [(c.component_id, c.version) for c in client.reports[-1].components] == [(COMPONENT, "2.0.0")]


async def test_an_image_that_fails_its_trial_is_rolled_back_and_the_previous_one_runs_again(
    device: Device,
) -> None:
    client = plan_for(device, "2.0.0", crash=True)
    apps = Apps(device.world, verdict="the application crashed during its trial: exit 3")
    await device.updater(client, apps).check_once()
    assert device.installed_version() == "1.0.0"
    assert apps.running == {COMPONENT: "1.0.0"}
    [result] = client.reports[-1].results
    assert (result.state, result.code) == (UpdateState.ROLLED_BACK, "app_unhealthy")
    assert "exit 3" in result.message


async def test_an_image_measured_launch_refuses_is_rolled_back(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    apps = Apps(device.world)
    original = apps.replace

    async def refusing(record: InstallRecord | None, component_id: str) -> None:
        if record is not None and record.version == "2.0.0":
            raise LaunchRefused("the signature is not valid", code="package_signature_invalid")
        await original(record, component_id)

    apps.replace = refusing  # type: ignore[method-assign]
    await device.updater(client, apps).check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.ROLLED_BACK, "package_signature_invalid")]


async def test_a_refused_download_leaves_the_device_on_what_it_runs(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    client.refuse_download = UpdateRefused("hashes differ", code="image_hash_mismatch")
    await device.updater(client, Apps(device.world)).check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.FAILED, "image_hash_mismatch")]


async def test_outside_the_maintenance_window_the_update_waits(device: Device) -> None:
    window = MaintenanceWindow(dt.time(1, 0), dt.time(4, 0))  # it is noon
    client = plan_for(device, "2.0.0", window=window)
    await device.updater(client, Apps(device.world)).check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.DEFERRED, "outside_window")]


async def test_an_application_deferring_updates_holds_its_update_back(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    apps = Apps(device.world, deferred=NOON + dt.timedelta(minutes=10))
    await device.updater(client, apps).check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.DEFERRED, "deferred_by_app")]


async def test_results_the_director_did_not_get_are_kept_across_a_restart(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    client.offline = True
    await device.updater(client, Apps(device.world)).check_once()
    assert client.reports == []
    client.offline = False
    restarted = device.updater(client, Apps(device.world))
    assert [result.state for result in restarted.pending_results()] == [UpdateState.INSTALLED]
    client.plan = Plan(assignment_version=1, deployment_id=DEPLOYMENT, window=None, images=())
    await restarted.check_once()
    assert [result.state for result in client.reports[0].results] == [UpdateState.INSTALLED]
    assert restarted.pending_results() == ()


async def test_a_trial_the_agent_did_not_live_through_is_rolled_back_at_start_and_reported(
    device: Device,
) -> None:
    client = plan_for(device, "2.0.0")
    apps = Apps(device.world)
    updater = device.updater(client, apps)
    # the agent dies during the trial: the switch happened, the trial never ended
    image = client.plan.images[0]
    slots = ComponentSlots.open(device.state_dir, device.apps_dir, COMPONENT)
    target = slots.download_path(image.sha256, image.target.length)
    target.path.write_bytes(client.blobs[image.sha256])
    slots.stage(image.sha256, "2.0.0", image.custom.signature_bytes())
    slots.switch(DEPLOYMENT, NOON)
    assert device.installed_version() == "2.0.0"

    recoveries = updater.recover()
    assert [recovery.failed is not None for recovery in recoveries] == [True]
    assert device.installed_version() == "1.0.0"
    [result] = updater.pending_results()
    assert (result.version, result.state, result.code) == ("2.0.0", UpdateState.ROLLED_BACK, "interrupted")
    # and it is not tried again for the same deployment
    client.downloads = 0
    await updater.check_once()
    assert client.downloads == 0
    assert device.installed_version() == "1.0.0"


def test_a_maintenance_window_opens_at_its_start_the_next_day_when_it_has_passed() -> None:
    window = MaintenanceWindow(dt.time(1, 0), dt.time(4, 0))
    assert window.next_start(NOON) == dt.datetime(2026, 3, 2, 1, 0, tzinfo=dt.UTC)
    early = NOON.replace(hour=0, minute=30)
    assert window.next_start(early) == early.replace(hour=1, minute=0)
    inside = NOON.replace(hour=2)
    assert window.next_start(inside) == inside


async def test_a_refused_check_is_reported_to_the_director_and_cleared_by_a_good_one(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    refusing = RefusingClient(client)
    updater = device.updater(refusing, Apps(device.world))
    with pytest.raises(UpdateRefused):
        await updater.check_once()
    refusal = client.reports[-1].refusal
    assert refusal is not None
    assert (refusal.code, refusal.message) == ("metadata_expired", "the timestamp expired")
    refusing.refusal = None
    await updater.check_once()
    assert client.reports[-1].refusal is None


async def test_a_download_the_network_cut_is_still_downloading_and_retried_soon(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    client.cut = TransportError("the connection was reset", code="download_interrupted")
    updater = device.updater(client, Apps(device.world))
    await updater.check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.DOWNLOADING, "download_interrupted")]
    assert updater.retry_at == NOON + dt.timedelta(seconds=60)
    client.cut = None
    await updater.check_once()
    assert last_state(client) == [("2.0.0", UpdateState.INSTALLED, None)]


async def test_an_image_that_was_rolled_back_is_not_tried_again_for_the_same_deployment(
    device: Device,
) -> None:
    client = plan_for(device, "2.0.0", crash=True)
    apps = Apps(device.world, verdict="it crashed")
    await device.updater(client, apps).check_once()
    assert last_state(client) == [("2.0.0", UpdateState.ROLLED_BACK, "app_unhealthy")]
    client.downloads = 0
    restarted = device.updater(client, apps)  # what was given up survives a restart
    await restarted.check_once()
    assert client.downloads == 0
    assert device.installed_version() == "1.0.0"


async def test_going_back_to_the_package_kept_in_the_other_slot_needs_no_download(device: Device) -> None:
    first = plan_for(device, "2.0.0")
    apps = Apps(device.world)
    await device.updater(first, apps).check_once()
    second = plan_for(device, "3.0.0")
    await device.updater(second, apps).check_once()
    assert device.installed_version() == "3.0.0"
    # the director assigns 2.0.0 again (a rollback to the previous deployment): it is still in a slot
    again = Plan(assignment_version=3, deployment_id="d-2", window=None, images=first.plan.images)
    first.plan = again
    first.downloads = 0
    await device.updater(first, apps).check_once()
    assert device.installed_version() == "2.0.0"
    assert first.downloads == 0
    [result] = first.reports[-1].results
    assert (result.state, result.bytes_downloaded) == (UpdateState.INSTALLED, 0)
    assert result.bytes_saved == first.plan.images[0].target.length


def agent_plan(device: Device, version: str) -> FakeClient:
    """A plan with one agent image (a small package naming the agent's component)."""
    manifest = Manifest(
        name="fleetward-agent", component_id=AGENT_COMPONENT_ID, entry_point=AGENT_ENTRY_POINT
    )
    data = build_package(manifest, {AGENT_ENTRY_POINT: b"print('agent')\n"})
    signature = sign_package(device.world.publisher, data)
    path = target_path(PRODUCT, AGENT_COMPONENT_ID, version)
    custom = TargetCustom(
        component_id=AGENT_COMPONENT_ID,
        version=version,
        product_id=PRODUCT,
        publisher_signature=base64.b64encode(signature).decode(),
    )
    target = TargetFile.from_data(path, data)
    target.unrecognized_fields["custom"] = custom.model_dump(mode="json", exclude_none=True)
    image = PlannedImage(AGENT_COMPONENT_ID, version, ImageKind.AGENT, target, custom)
    plan = Plan(assignment_version=1, deployment_id=DEPLOYMENT, window=None, images=(image,))
    return FakeClient(plan, {image.sha256: data})


async def test_an_agent_image_goes_into_the_agents_slots_and_the_agent_restarts_on_it(device: Device) -> None:
    client = agent_plan(device, "9.0.0")
    apps = Apps(device.world)
    updater = device.updater(client, apps)
    await updater.check_once()
    assert apps.restarts == 1
    assert apps.running == {}  # never launched as an application
    sent = [(result.version, result.state) for report in client.reports for result in report.results]
    assert sent[-1] == ("9.0.0", UpdateState.TRIAL)  # sent before the restart
    assert device.installed_version() == "1.0.0"
    record = read_install_record(agent_record_dir(device.state_dir) / f"{AGENT_COMPONENT_ID}.toml")
    assert record.version == "9.0.0"
    assert not (device.apps_dir / f"{AGENT_COMPONENT_ID}.toml").exists()  # boot launches apps/ only


async def test_the_new_agent_keeps_its_trial_at_start_and_commits_it_once_healthy(device: Device) -> None:
    client = agent_plan(device, "9.0.0")
    await device.updater(client, Apps(device.world)).check_once()
    sha256 = client.plan.images[0].sha256
    new_agent = device.updater(client, Apps(device.world), agent_sha256=sha256)
    assert new_agent.recover() == ()  # the agent on trial is not rolled back by its own start
    trial = new_agent.agent_trial()
    assert trial is not None
    assert trial.version == "9.0.0"
    await new_agent.commit_agent()
    assert new_agent.agent_trial() is None
    assert last_state(client) == [("9.0.0", UpdateState.INSTALLED, None)]
    components = {(c.component_id, c.version) for c in client.reports[-1].components}
    assert (AGENT_COMPONENT_ID, "9.0.0") in components
    # the director sees it installed: the next check does not install it again
    assert AGENT_COMPONENT_ID in new_agent._installed()


async def test_an_agent_that_is_not_the_one_on_trial_rolls_the_trial_back_at_start(device: Device) -> None:
    client = agent_plan(device, "9.0.0")
    await device.updater(client, Apps(device.world)).check_once()
    # the launcher saw the new agent start twice without a commit: it marked the trial failed
    agent_slots(device.state_dir).mark_failed(AGENT_DID_NOT_START)
    old_agent = device.updater(client, Apps(device.world), agent_sha256="0" * 64)
    assert old_agent.agent_trial() is None
    [recovery] = old_agent.recover()
    assert recovery.failed is not None
    assert not (agent_record_dir(device.state_dir) / f"{AGENT_COMPONENT_ID}.toml").exists()
    [result] = old_agent.pending_results()
    assert (result.state, result.code) == (UpdateState.ROLLED_BACK, AGENT_DID_NOT_START)
    assert "did not start" in result.message
    await old_agent.check_once()  # delivered once; not tried again for this deployment
    assert old_agent.pending_results() == ()
    assert client.downloads == 1
    assert device.updater(client, Apps(device.world)).pending_results() == ()


async def test_an_image_whose_kind_and_component_disagree_is_refused(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    image = client.plan.images[0]
    agent_image = PlannedImage(image.component_id, image.version, ImageKind.AGENT, image.target, image.custom)
    client.plan = Plan(assignment_version=1, deployment_id=DEPLOYMENT, window=None, images=(agent_image,))
    await device.updater(client, Apps(device.world)).check_once()
    assert device.installed_version() == "1.0.0"
    assert last_state(client) == [("2.0.0", UpdateState.FAILED, "agent_component_mismatch")]


async def test_outside_its_window_an_update_is_looked_at_again_when_the_window_opens(device: Device) -> None:
    window = MaintenanceWindow(dt.time(1, 0), dt.time(4, 0))
    updater = device.updater(plan_for(device, "2.0.0", window=window), Apps(device.world))
    await updater.check_once()
    assert updater.retry_at == dt.datetime(2026, 3, 2, 1, 0, tzinfo=dt.UTC)


@dataclass
class RefusingClient:
    """The fake client, refusing every check while ``refusal`` is set."""

    inner: FakeClient
    refusal: UpdateRefused | None = field(
        default_factory=lambda: UpdateRefused("the timestamp expired", code="metadata_expired")
    )

    def check(self, installed: Mapping[str, tuple[str, str]]) -> Plan:
        if self.refusal is not None:
            raise self.refusal
        return self.inner.check(installed)

    def download(self, image: PlannedImage, partial: Path, have: Path | None) -> Downloaded:
        return self.inner.download(image, partial, have)

    def report(self, report: VersionReport) -> None:
        self.inner.report(report)


async def test_an_application_told_of_its_update_may_defer_it_before_it_starts(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    apps = Apps(device.world, defer_when_told=NOON + dt.timedelta(hours=1))
    settings = UpdaterSettings(
        state_dir=device.state_dir, apps_dir=device.apps_dir, trial_seconds=0.1, notice_seconds=5
    )
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    updater = Updater(settings, client, apps, clock=device.clock, sleep=sleep)
    await updater.check_once()
    assert [event.kind for event in apps.events] == [SystemEventKind.UPDATE_PENDING]
    assert apps.events[0].details == {"component_id": COMPONENT, "version": "2.0.0", "notice_seconds": 5}
    assert slept == [5]
    assert last_state(client) == [("2.0.0", UpdateState.DEFERRED, "deferred_by_app")]
    assert client.downloads == 0
    # once the deferral is over, the update goes on without a second notice
    apps.deferred = None
    await updater.check_once()
    assert [event.kind for event in apps.events] == [
        SystemEventKind.UPDATE_PENDING,
        SystemEventKind.UPDATE_STARTED,
    ]
    assert slept == [5]
    assert device.installed_version() == "2.0.0"


async def test_a_check_with_nothing_to_install_tells_the_applications_so(device: Device) -> None:
    client = plan_for(device, "2.0.0")
    client.plan = Plan(assignment_version=1, deployment_id=None, window=None, images=())
    apps = Apps(device.world)
    await device.updater(client, apps).check_once()
    assert [event.kind for event in apps.events] == [SystemEventKind.NO_UPDATE_AVAILABLE]
