"""Deployments, rollouts that stop themselves, and the director: the service on a real store (SQLite, and
PostgreSQL where it runs), with an in-memory image catalog and a fake "check now" behind their interfaces;
then the routes over HTTP."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, Signer
from sqlalchemy import event
from sqlalchemy.engine import Engine
from tuf.api.metadata import Root, TargetFile
from typer.testing import CliRunner

from fleetward.agent.manifest import Manifest
from fleetward.agent.package import build_package, sign_package
from fleetward.api import schemas_images as image_schemas
from fleetward.api.device_auth import UpdateDevice
from fleetward.cli.main import app as cli_app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.config import Limits
from fleetward.errors import Conflict, InvalidInput, NotFound, PermissionDenied, UpdateRefused
from fleetward.hub.routing import MethodResult
from fleetward.monitor.reports import ParsedReport
from fleetward.registry.access import Principal
from fleetward.registry.models import ClaimRequest, DeviceGroup, Role, UpdatePolicy
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store.schema import device_updates
from fleetward.updates import repository
from fleetward.updates.check_now import CHECK_METHOD, FakeNudger, OpenedWave, RouterNudger, check_now
from fleetward.updates.deployments import DeploymentService, DeploymentState
from fleetward.updates.models import Image
from fleetward.updates.repository import sign_root
from fleetward.updates.rollout import RolloutPlan, WaveSpec
from fleetward.wire.identity import device_id_for, public_key_der
from fleetward.wire.updates import (
    DIRECTOR_FIELD,
    CheckRefusal,
    ImageKind,
    InstalledComponent,
    TargetCustom,
    UpdateResult,
    UpdateState,
    VersionReport,
    device_token,
    director_entry,
    target_path,
    verify_assignment,
)

from .conftest import TenantSetup, healthy_software, make_tenant

# --------------------------------------------------------------------------- an in-memory image catalog


class FakeImages:
    """The image repository as deployments see it: images by id, their targets, the director's key."""

    def __init__(self) -> None:
        self.images: dict[tuple[str, str], Image] = {}
        self.signers: dict[str, CryptoSigner] = {}

    def add(self, tenant_id: str, product_id: str, component: str, version: str, kind: str = "app") -> Image:
        sha256 = hashlib.sha256(f"{component}-{version}".encode()).hexdigest()
        name, component = component, str(uuid.uuid5(uuid.NAMESPACE_DNS, component))
        image = Image(
            id=f"img-{name}-{version}".replace(".", "-"),
            tenant_id=tenant_id,
            product_id=product_id,
            component_id=component,
            kind=ImageKind(kind),
            version=version,
            sha256=sha256,
            length=1000,
            target_path=target_path(product_id, component, version),
            created_by="dev@example.com",
            created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        )
        self.images[(tenant_id, image.id)] = image
        return image

    def image(self, tenant_id: str, image_id: str) -> Image:
        found = self.images.get((tenant_id, image_id))
        if found is None:
            raise NotFound("no such image in this tenant", code="image_not_found")
        return found

    def director_signer(self, tenant_id: str) -> Signer:
        if tenant_id not in self.signers:
            self.signers[tenant_id] = CryptoSigner(ec.generate_private_key(ec.SECP256R1()))
        return self.signers[tenant_id]

    def target_file(self, tenant_id: str, image: Image) -> TargetFile:
        custom = TargetCustom(
            component_id=image.component_id,
            version=image.version,
            kind=image.kind,
            product_id=image.product_id,
            publisher_signature="c2ln",
        )
        return repository.target_file(image.target_path, image.length, image.sha256, custom)

    def root(self, tenant_id: str) -> Root:
        key = self.signers[tenant_id].public_key
        root = Root()
        root.keys[key.keyid] = key
        root.unrecognized_fields[DIRECTOR_FIELD] = director_entry([key], 1)
        return root


# --------------------------------------------------------------------------- a tenant with devices


@dataclass
class Fleet:
    services: Services
    clock: FakeClock
    images: FakeImages
    deployments: DeploymentService
    admin: Principal
    tenant_id: str
    product_id: str
    groups: dict[str, DeviceGroup]
    members: dict[str, list[str]] = field(default_factory=dict)

    def claim(self, group: str, count: int) -> list[str]:
        requests = []
        for _ in range(count):
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
            requests.append(ClaimRequest(device_id_for(key), public_key_der(key)))
        self.services.registry.claim_devices(self.admin, self.tenant_id, requests, self.groups[group].id)
        ids = [request.device_id for request in requests]
        self.members.setdefault(group, []).extend(ids)
        return ids

    def device(self, device_id: str) -> UpdateDevice:
        return UpdateDevice(self.tenant_id, device_id, "01", self.product_id, None)

    def row(self, device_id: str) -> tuple[str | None, int, str]:
        status = self.deployments.device_status(self.admin, self.tenant_id, device_id)
        return status.deployment_id, status.assignment_version, status.state

    def report(
        self,
        device_id: str,
        deployment_id: str,
        image: Image,
        state: UpdateState,
        *,
        runs: Image | None = None,
    ) -> None:
        running = runs if runs is not None else (image if state is UpdateState.INSTALLED else None)
        now = self.clock.now()
        report = VersionReport(
            assignment_version=self.row(device_id)[1],
            components=(
                ()
                if running is None
                else (
                    InstalledComponent(
                        component_id=running.component_id, version=running.version, sha256=running.sha256
                    ),
                )
            ),
            results=(
                UpdateResult(
                    deployment_id=deployment_id,
                    component_id=image.component_id,
                    version=image.version,
                    sha256=image.sha256,
                    state=state,
                    code="trial_unhealthy" if state is UpdateState.ROLLED_BACK else None,
                    message="the application did not come up" if state is UpdateState.ROLLED_BACK else "",
                    at=now,
                ),
            ),
            sent_at=now,
        )
        self.deployments.record_report(self.device(device_id), report)

    def crash(self, device_id: str, kind: str = "crash") -> None:
        now = self.clock.now()
        self.services.reports.record(
            self.tenant_id, device_id, ParsedReport(kind, "panel", "sig", "it crashed", now, "{}")
        )

    def events(self, code: str) -> list[str]:
        found = self.services.registry.list_events(self.admin, self.tenant_id, kind="deployment", limit=1000)
        return [event.detail for event in found if event.code == code]


def make_fleet(
    services: Services, clock: FakeClock, email: str = "admin@example.com", name: str = "farm"
) -> Fleet:
    _operator, token = services.registry.bootstrap(email, "Admin")
    admin = services.registry.authenticate(token)
    tenant = services.registry.create_tenant(admin, name)
    admin = services.registry.authenticate(token)
    product, groups = services.registry.create_product(admin, tenant.id, "panel-controller")
    images = FakeImages()
    return Fleet(
        services=services,
        clock=clock,
        images=images,
        deployments=DeploymentService(services.database, clock, services.settings.limits, images),
        admin=admin,
        tenant_id=tenant.id,
        product_id=product.id,
        groups={group.name: group for group in groups},
    )


@pytest.fixture
def fleet(services: Services, clock: FakeClock) -> Fleet:
    return make_fleet(services, clock)


def waves(*specs: str, **thresholds: object) -> RolloutPlan:
    return RolloutPlan(waves=tuple(WaveSpec.parse(spec) for spec in specs), **thresholds)  # type: ignore[arg-type]


def on(fleet: Fleet, deployment_id: str) -> set[str]:
    """The devices assigned ``deployment_id`` now."""
    return {
        device_id
        for ids in fleet.members.values()
        for device_id in ids
        if fleet.row(device_id)[0] == deployment_id
    }


def completed(fleet: Fleet, group: str, image: Image) -> str:
    """A deployment of ``image`` to ``group`` in one wave, installed everywhere: the group's current one."""
    created = fleet.deployments.create(fleet.admin, fleet.tenant_id, fleet.groups[group].id, [image.id])
    for device_id in fleet.members.get(group, []):
        fleet.report(device_id, created.id, image, UpdateState.INSTALLED)
    fleet.deployments.tick(fleet.tenant_id)
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).state is DeploymentState.CURRENT
    return created.id


# --------------------------------------------------------------------------- waves


def test_the_next_wave_opens_only_after_the_success_threshold_and_is_nudged(fleet: Fleet) -> None:
    ids = fleet.claim("Field Test", 20)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("5", "all")
    )
    first = on(fleet, created.id)
    assert len(first) == 5
    assert created.wave_sizes == (5, 15)
    nudger = FakeNudger()
    assert asyncio.run(fleet.deployments.check_now(nudger)) == 5
    assert {device for _tenant, device in nudger.nudged} == first

    for device_id in sorted(first)[:4]:
        fleet.report(device_id, created.id, image, UpdateState.INSTALLED)
    fleet.deployments.tick()
    assert on(fleet, created.id) == first, "4 of 5 is below 90%: the next wave waits"

    fleet.clock.advance(1)  # past rollout_judge_interval_milliseconds since the last judge
    fleet.report(sorted(first)[4], created.id, image, UpdateState.INSTALLED)  # judged again on report
    assert on(fleet, created.id) == set(ids)
    nudger = FakeNudger()
    asyncio.run(fleet.deployments.check_now(nudger))
    assert {device for _tenant, device in nudger.nudged} == set(ids) - first
    shown = fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id)
    assert shown.waves_opened == 2
    assert (shown.waves[0].installed, shown.waves[1].assigned) == (5, 15)
    assert fleet.events("wave_opened")

    for device_id in set(ids) - first:
        fleet.report(device_id, created.id, image, UpdateState.INSTALLED)
    fleet.deployments.tick()
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).state is DeploymentState.CURRENT


def test_failures_abort_and_the_devices_reached_get_the_previous_deployment_again(fleet: Fleet) -> None:
    ids = fleet.claim("Field Test", 20)
    old = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    new = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.1.0")
    previous = completed(fleet, "Field Test", old)
    versions = {device_id: fleet.row(device_id)[1] for device_id in ids}

    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [new.id], waves("10", "all")
    )
    reached = on(fleet, created.id)
    assert len(reached) == 10
    asyncio.run(fleet.deployments.check_now(FakeNudger()))
    bad = sorted(reached)[:2]
    for device_id in bad:
        fleet.report(device_id, created.id, new, UpdateState.ROLLED_BACK, runs=old)
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).state is (
        DeploymentState.ROLLING_OUT
    ), "the second report came within the judge interval of the first"
    fleet.clock.advance(1)
    fleet.deployments.judge_reported()

    aborted = fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id)
    assert aborted.state is DeploymentState.ABORTED
    assert "2 failed or rolled back" in aborted.reason
    assert aborted.waves[0].rolled_back == 2, "the counts at the end are kept"
    assert on(fleet, previous) == set(ids), "the rollback: every device reached is on the previous one"
    for device_id in ids:
        grew = fleet.row(device_id)[1] - versions[device_id]
        assert grew == (2 if device_id in reached else 0)
    nudger = FakeNudger()
    asyncio.run(fleet.deployments.check_now(nudger))
    assert {device for _tenant, device in nudger.nudged} == reached, "the rolled-back devices check now"
    assert any("assigned" in detail and previous in detail for detail in fleet.events("aborted"))


def test_devices_silent_past_the_report_timeout_abort_the_rollout(fleet: Fleet) -> None:
    fleet.claim("Field Test", 10)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin,
        fleet.tenant_id,
        fleet.groups["Field Test"].id,
        [image.id],
        waves("5", "all", report_timeout_seconds=600),
    )
    fleet.clock.advance(599)
    fleet.deployments.tick()
    assert (
        fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).state is DeploymentState.ROLLING_OUT
    )
    fleet.clock.advance(2)
    outcome = fleet.deployments.tick()
    assert outcome.aborted == (created.id,)
    shown = fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id)
    assert "silent" in shown.reason
    assert shown.waves[0].silent == 5
    assert on(fleet, created.id) == set(), "with no previous deployment, the devices are left unassigned"


def test_rising_crash_reports_abort_the_rollout(fleet: Fleet) -> None:
    ids = fleet.claim("Field Test", 10)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    fleet.crash(ids[0])  # before: one crash in a week, across 10 devices
    fleet.clock.advance(60)
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("5", "all")
    )
    reached = sorted(on(fleet, created.id))
    fleet.clock.advance(60)
    for device_id in reached[:3]:
        fleet.report(device_id, created.id, image, UpdateState.INSTALLED)
        fleet.crash(device_id)
    outcome = fleet.deployments.tick()
    assert outcome.aborted == (created.id,)
    assert "crash_rate" in fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).reason


def test_crash_loops_count_as_unhealthy(fleet: Fleet) -> None:
    fleet.claim("Field Test", 10)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id]
    )
    reached = sorted(on(fleet, created.id))
    for device_id in reached:
        fleet.report(device_id, created.id, image, UpdateState.TRIAL)
    fleet.crash(reached[0], "launch_refused")
    fleet.crash(reached[1], "launch_refused")
    assert fleet.deployments.tick().aborted == (created.id,)
    assert "unhealthy" in fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).reason


def refusing(
    fleet: Fleet, device_id: str, code: str | None, *, runs: Image | None = None, ago: float = 0
) -> None:
    """The device reports after a check that refused what it was given ``ago`` seconds ago (``code``), or
    after one that refused nothing (``None``)."""
    now = fleet.clock.now()
    refusal = (
        None
        if code is None
        else CheckRefusal(code=code, message=f"refused: {code}", at=now - dt.timedelta(seconds=ago))
    )
    components = (
        ()
        if runs is None
        else (InstalledComponent(component_id=runs.component_id, version=runs.version, sha256=runs.sha256),)
    )
    report = VersionReport(
        assignment_version=fleet.row(device_id)[1], components=components, refusal=refusal, sent_at=now
    )
    fleet.deployments.record_report(fleet.device(device_id), report)


def test_devices_refusing_what_they_are_given_fail_and_abort_the_rollout(fleet: Fleet) -> None:
    """A release whose metadata devices refuse aborts by the failure threshold instead of holding."""
    ids = fleet.claim("Field Test", 10)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("all")
    )
    first, second, third, late = sorted(ids)[:4]

    refusing(fleet, first, "version_below_floor")
    status = fleet.deployments.device_status(fleet.admin, fleet.tenant_id, first)
    assert (status.state, status.code) == ("failed", "version_below_floor")
    assert "refused: version_below_floor" in status.message
    # a later check that refuses nothing: the state follows the results again
    fleet.clock.advance(1)
    refusing(fleet, first, None)
    status = fleet.deployments.device_status(fleet.admin, fleet.tenant_id, first)
    assert (status.state, status.code, status.message) == ("assigned", None, "")
    refusing(fleet, first, None, runs=image)
    assert fleet.row(first)[2] == "installed"
    # a refusal older than the assignment was of what the device was given before it
    refusing(fleet, late, "metadata_expired", ago=3600)
    assert fleet.row(late)[2] == "assigned"

    refusing(fleet, second, "metadata_signature_invalid")
    fleet.clock.advance(1)
    assert (
        fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).state is DeploymentState.ROLLING_OUT
    )
    refusing(fleet, third, "metadata_signature_invalid")
    aborted = fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id)
    assert aborted.state is DeploymentState.ABORTED, "2 of 10 failed: the failure threshold"
    assert "2 failed" in aborted.reason
    status = fleet.deployments.device_status(fleet.admin, fleet.tenant_id, third)
    assert status.code == "rollout_aborted"
    assert "metadata_signature_invalid" in status.message


def test_a_refusal_of_a_deployment_not_rolling_out_changes_nothing(fleet: Fleet) -> None:
    [device_id] = fleet.claim("Field Test", 1)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    completed(fleet, "Field Test", image)
    refusing(fleet, device_id, "metadata_expired")
    assert fleet.row(device_id)[2] == "installed"


def test_a_burst_of_reports_judges_the_rollout_once_and_the_rest_after_the_interval(
    fleet: Fleet, limits: Limits
) -> None:
    ids = fleet.claim("Field Test", 40)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("10", "all")
    )
    first = sorted(on(fleet, created.id))
    before = fleet.deployments.judgements
    for device_id in first:  # every report within one interval
        fleet.report(device_id, created.id, image, UpdateState.INSTALLED)
    assert fleet.deployments.judgements == before + 1
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, created.id).waves_opened == 1

    fleet.clock.advance(limits.rollout_judge_interval_milliseconds / 1000 / 2)
    fleet.deployments.judge_reported()
    assert fleet.deployments.judgements == before + 1, "the interval is not over yet"
    fleet.clock.advance(limits.rollout_judge_interval_milliseconds / 1000 / 2)
    outcome = fleet.deployments.judge_reported()
    assert fleet.deployments.judgements == before + 2
    assert [wave.wave for wave in outcome.opened] == [1], "the reports held back open the next wave"
    assert len(on(fleet, created.id)) == len(ids)
    fleet.clock.advance(1)
    fleet.deployments.judge_reported()
    assert fleet.deployments.judgements == before + 2, "nothing was reported since"


def test_assigning_devices_reads_and_writes_only_the_tenants_update_rows(fleet: Fleet) -> None:
    fleet.claim("Field Test", 3)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    current = completed(fleet, "Field Test", image)
    statements: list[str] = []

    def seen(
        _connection: object,
        _cursor: object,
        statement: str,
        _parameters: object,
        _context: object,
        _many: bool,
    ) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        fleet.deployments.create(fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id])
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    on_rows = [
        statement
        for statement in statements
        if "device_updates" in statement and not statement.lstrip().upper().startswith("INSERT")
    ]
    assert on_rows
    for statement in on_rows:
        assert "device_updates.tenant_id" in statement or "tenant_id =" in statement, statement
    assert on(fleet, current) == set()


# --------------------------------------------------------------------------- members, policies, roles


def test_new_group_members_get_the_current_deployment(fleet: Fleet) -> None:
    fleet.claim("Field Test", 3)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    current = completed(fleet, "Field Test", image)
    late = fleet.claim("Field Test", 2)
    assert fleet.deployments.tick().new_members == 2
    assert all(fleet.row(device_id)[0] == current for device_id in late)
    # a device that asks before any tick is welcomed by the director itself
    later = fleet.claim("Field Test", 1)[0]
    assert fleet.deployments.assignment_for(fleet.device(later)) is not None
    assert fleet.row(later)[0] == current


def test_a_device_moved_into_a_group_is_a_new_member_and_one_moved_out_gets_nothing(fleet: Fleet) -> None:
    [mover] = fleet.claim("Field Test", 1)
    fleet.claim("Production", 1)
    panel = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    in_field = completed(fleet, "Field Test", panel)
    in_production = completed(fleet, "Production", panel)
    assert fleet.row(mover)[0] == in_field
    fleet.services.registry.move_device(fleet.admin, fleet.tenant_id, mover, fleet.groups["Production"].id)
    fleet.deployments.tick()
    assert fleet.row(mover)[0] == in_production
    fleet.services.registry.move_device(fleet.admin, fleet.tenant_id, mover, None)
    assert fleet.deployments.assignment_for(fleet.device(mover)) is None


def test_update_policies_decide_what_a_group_may_be_given(fleet: Fleet) -> None:
    app = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    agent = fleet.images.add(fleet.tenant_id, fleet.product_id, "fleetward-agent", "2.0.0", "agent")
    groups = fleet.services.registry
    no_updates = groups.update_group(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, update_policy=UpdatePolicy.NO_UPDATES
    )
    with pytest.raises(Conflict) as refused:
        fleet.deployments.create(fleet.admin, fleet.tenant_id, no_updates.id, [app.id])
    assert refused.value.code == "group_no_updates"
    development = fleet.groups["Development"].id  # No3rdPartyAppUpdates
    completed(fleet, "Field Test OS Evaluation", agent)
    with pytest.raises(InvalidInput) as filtered:
        fleet.deployments.create(fleet.admin, fleet.tenant_id, development, [app.id, agent.id])
    assert filtered.value.code == "policy_refuses"
    assert fleet.deployments.create(fleet.admin, fleet.tenant_id, development, [agent.id]).image_ids == (
        agent.id,
    )


def test_a_deployment_names_images_of_the_groups_product_one_per_component(fleet: Fleet) -> None:
    group = fleet.groups["Field Test"].id
    one = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    two = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.1.0")
    other = fleet.images.add(fleet.tenant_id, "another-product", "panel", "9.0.0")
    cases = [([one.id, two.id], "component_twice"), ([other.id], "image_other_product"), ([], "no_images")]
    for image_ids, code in cases:
        with pytest.raises(InvalidInput) as refused:
            fleet.deployments.create(fleet.admin, fleet.tenant_id, group, image_ids)
        assert refused.value.code == code
    with pytest.raises(NotFound):
        fleet.deployments.create(fleet.admin, fleet.tenant_id, group, ["img-unknown"])
    fleet.deployments.create(fleet.admin, fleet.tenant_id, group, [one.id])
    with pytest.raises(Conflict) as busy:
        fleet.deployments.create(fleet.admin, fleet.tenant_id, group, [two.id])
    assert busy.value.code == "rollout_in_progress"


def test_os_evaluation_groups_see_an_agent_release_before_retail_groups(fleet: Fleet) -> None:
    agent = fleet.images.add(fleet.tenant_id, fleet.product_id, "fleetward-agent", "2.0.0", "agent")
    production = fleet.groups["Production"].id
    with pytest.raises(Conflict) as refused:
        fleet.deployments.create(fleet.admin, fleet.tenant_id, production, [agent.id])
    assert refused.value.code == "os_evaluation_first"
    fleet.claim("Production OS Evaluation", 2)
    completed(fleet, "Production OS Evaluation", agent)
    assert fleet.deployments.create(fleet.admin, fleet.tenant_id, production, [agent.id]).state is (
        DeploymentState.ROLLING_OUT
    )


def test_a_reader_sees_deployments_but_cannot_deploy_abort_or_revert(fleet: Fleet) -> None:
    registry = fleet.services.registry
    _operator, token = registry.create_operator(fleet.admin, "reader@example.com", "Reader")
    registry.assign_role(fleet.admin, fleet.tenant_id, "reader@example.com", Role.READER)
    reader = registry.authenticate(token)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    group = fleet.groups["Field Test"].id
    with pytest.raises(PermissionDenied):
        fleet.deployments.create(reader, fleet.tenant_id, group, [image.id])
    created = fleet.deployments.create(fleet.admin, fleet.tenant_id, group, [image.id])
    assert [found.id for found in fleet.deployments.list_deployments(reader, fleet.tenant_id, group)] == [
        created.id
    ]
    with pytest.raises(PermissionDenied):
        fleet.deployments.abort(reader, fleet.tenant_id, created.id)
    with pytest.raises(PermissionDenied):
        fleet.deployments.revert(reader, fleet.tenant_id, group)


def test_another_tenant_never_sees_this_tenants_deployments(fleet: Fleet) -> None:
    [device_id] = fleet.claim("Field Test", 1)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id]
    )
    registry = fleet.services.registry
    _operator, token = registry.create_operator(
        fleet.admin, "rival@example.com", "Rival", can_create_tenants=True
    )
    rival = registry.authenticate(token)
    theirs = registry.create_tenant(rival, "rival")
    rival = registry.authenticate(token)
    with pytest.raises(PermissionDenied):
        fleet.deployments.get(rival, fleet.tenant_id, created.id)
    with pytest.raises(NotFound):
        fleet.deployments.get(rival, theirs.id, created.id)
    with pytest.raises(NotFound):
        fleet.deployments.device_status(rival, theirs.id, device_id)
    assert fleet.deployments.assignment_for(UpdateDevice(theirs.id, device_id, "02", None, None)) is None
    assert fleet.deployments.assignment_for(fleet.device(device_id)) is not None


# --------------------------------------------------------------------------- the director


def test_the_assignment_is_signed_for_the_device_and_its_version_only_grows(fleet: Fleet) -> None:
    [device_id] = fleet.claim("Field Test", 1)
    group = fleet.groups["Field Test"].id
    old = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    new = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.1.0")
    assert fleet.deployments.assignment_for(fleet.device(device_id)) is None
    seen: list[int] = []

    def check(image: Image) -> None:
        data = fleet.deployments.assignment_for(fleet.device(device_id))
        assert data is not None
        root = fleet.images.root(fleet.tenant_id)
        verified = verify_assignment(data, root, device_id=device_id, now=fleet.clock.now())
        assert [target.path for target in verified.targets.values()] == [image.target_path]
        assert verified.deployment_id == fleet.row(device_id)[0]
        seen.append(verified.version)

    first = completed(fleet, "Field Test", old)
    check(old)
    fleet.deployments.create(fleet.admin, fleet.tenant_id, group, [new.id], window=None)
    check(new)
    fleet.report(device_id, fleet.row(device_id)[0] or "", new, UpdateState.FAILED, runs=old)
    check(old)  # aborted: the previous one again
    second = completed(fleet, "Field Test", new)
    check(new)
    reverted = fleet.deployments.revert(fleet.admin, fleet.tenant_id, group)
    assert reverted.image_ids == (old.id,)
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, second).state is DeploymentState.REVERTED
    assert fleet.deployments.get(fleet.admin, fleet.tenant_id, first).state is DeploymentState.SUPERSEDED
    check(old)
    assert seen == sorted(set(seen)), f"assignment versions only grow: {seen}"
    root = fleet.images.root(fleet.tenant_id)
    data = fleet.deployments.assignment_for(fleet.device(device_id))
    assert data is not None
    with pytest.raises(UpdateRefused, match="older"):
        verify_assignment(data, root, device_id=device_id, now=fleet.clock.now(), newer_than=seen[-1] + 1)


def test_an_assignment_is_cached_until_half_its_life_then_signed_again(fleet: Fleet, limits: Limits) -> None:
    [device_id] = fleet.claim("Field Test", 1)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    fleet.deployments.create(fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id])
    once = fleet.deployments.assignment_for(fleet.device(device_id))
    assert fleet.deployments.assignment_for(fleet.device(device_id)) is once
    fleet.clock.advance(limits.assignment_ttl_seconds / 2 + 1)
    again = fleet.deployments.assignment_for(fleet.device(device_id))
    assert again is not None
    assert again != once


def test_a_no_updates_group_is_assigned_nothing_even_with_an_old_deployment(fleet: Fleet) -> None:
    [device_id] = fleet.claim("Field Test", 1)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    completed(fleet, "Field Test", image)
    fleet.services.registry.update_group(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, update_policy=UpdatePolicy.NO_UPDATES
    )
    assert fleet.deployments.assignment_for(fleet.device(device_id)) is None


def test_the_device_status_says_what_runs_what_is_pending_and_why_it_failed(fleet: Fleet) -> None:
    device_id, _other = fleet.claim("Field Test", 2)
    old = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    new = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.1.0")
    created = fleet.deployments.create(
        fleet.admin,
        fleet.tenant_id,
        fleet.groups["Field Test"].id,
        [new.id],
        waves("all", max_failure_fraction=1),
    )
    fleet.report(device_id, created.id, new, UpdateState.ROLLED_BACK, runs=old)
    status = fleet.deployments.device_status(fleet.admin, fleet.tenant_id, device_id)
    assert (status.state, status.code) == ("rolled_back", "trial_unhealthy")
    assert status.running == ((old.component_id, "1.0.0", old.sha256),)
    assert status.pending_image_ids == (new.id,)


def test_operators_abort_a_rollout_once(fleet: Fleet) -> None:
    fleet.claim("Field Test", 4)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id]
    )
    aborted = fleet.deployments.abort(fleet.admin, fleet.tenant_id, created.id, "wrong build")
    assert aborted.state is DeploymentState.ABORTED
    assert "wrong build" in aborted.reason
    with pytest.raises(Conflict):
        fleet.deployments.abort(fleet.admin, fleet.tenant_id, created.id)


def test_two_processes_ticking_at_once_open_a_wave_once(fleet: Fleet) -> None:
    fleet.claim("Field Test", 10)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    created = fleet.deployments.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("2", "all")
    )
    others = [
        DeploymentService(fleet.services.database, fleet.clock, fleet.services.settings.limits, fleet.images)
        for _ in range(4)
    ]
    with fleet.services.database.write() as connection:  # installed, as another process recorded it
        connection.execute(
            device_updates.update()
            .where(device_updates.c.deployment_id == created.id)
            .values(state="installed")
        )
    barrier = threading.Barrier(len(others))

    def tick(service: DeploymentService) -> None:
        barrier.wait()
        service.tick()

    threads = [threading.Thread(target=tick, args=(service,)) for service in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fleet.events("wave_opened")) == 1
    assert all(fleet.row(device_id)[1] == 1 for device_id in fleet.members["Field Test"])


# --------------------------------------------------------------------------- check now


@dataclass
class FakeRouter:
    """The hub router's method call, as the real nudger uses it: some devices are offline."""

    offline: set[str]
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def invoke_method(
        self, tenant_id: str, device_id: str, name: str, payload: bytes, timeout_seconds: float
    ) -> MethodResult:
        self.calls.append((device_id, name))
        if device_id in self.offline:
            raise NotFound("the device is not connected", code="device_offline")
        return MethodResult(200, b"{}")


def test_check_now_calls_the_method_on_each_device_and_skips_offline_ones() -> None:
    router = FakeRouter(offline={"b"})
    nudger = RouterNudger(router, timeout_seconds=1)  # type: ignore[arg-type]
    reached = asyncio.run(check_now(nudger, [OpenedWave("t", "d", 0, ("a", "b", "c"))], concurrency=2))
    assert reached == 2
    assert sorted(router.calls) == [("a", CHECK_METHOD), ("b", CHECK_METHOD), ("c", CHECK_METHOD)]


# --------------------------------------------------------------------------- the routes, end to end

ROUTE_COMPONENT = "6d0c1f8e-3b2a-4c5d-9e8f-0a1b2c3d4e5f"


class RealRepo:
    """A tenant with a real image repository (images through the API) and enrolled devices."""

    def __init__(self, server: BackgroundServer, tenant: TenantSetup, services: Services) -> None:
        self.server = server
        self.tenant = tenant
        self.services = services
        self.base = f"/v1/tenants/{tenant.id}"
        self.publisher = ec.generate_private_key(ec.SECP256R1())
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
        pems = [
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
            for key in keys
        ]
        proposal = tenant.client.post_bytes(
            f"{self.base}/repository/root-proposal",
            image_schemas.RootProposalCreate(root_keys=pems, threshold=1),
        )
        signed = sign_root(proposal, [CryptoSigner(keys[0])])
        tenant.client.request_json("PUT", f"{self.base}/repository/root", json.loads(signed))

    def add(self, version: str) -> image_schemas.ImagePublic:
        manifest = Manifest(name="panel-monitor", component_id=ROUTE_COMPONENT, entry_point="bin/app")
        data = build_package(manifest, {"bin/app": b"#!/bin/sh\necho " + version.encode() + b"\n"})
        return self.tenant.client.post(
            f"{self.base}/images",
            image_schemas.ImageCreate(
                product_id=self.tenant.product.id,
                version=version,
                package_base64=base64.b64encode(data).decode(),
                signature_base64=base64.b64encode(sign_package(self.publisher, data)).decode(),
            ),
            image_schemas.ImagePublic,
        )

    def enroll(self, name: str) -> SimulatedDevice:
        device = SimulatedDevice(name, healthy_software())
        self.tenant.claim(device)

        async def run() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                await device.enroll(self.server.url, http)

        asyncio.run(run())
        return device


def token(device: SimulatedDevice) -> dict[str, str]:
    credential = device.credential
    assert credential is not None
    return {"Authorization": device_token(credential.key, credential.issued.serial, int(time.time()))}


def installed(image: image_schemas.ImagePublic, deployment_id: str, state: UpdateState) -> dict[str, object]:
    now = dt.datetime.now(dt.UTC)
    runs = [{"component_id": image.component_id, "version": image.version, "sha256": image.sha256}]
    return VersionReport.model_validate(
        {
            "components": runs if state is UpdateState.INSTALLED else [],
            "results": [
                {
                    "deployment_id": deployment_id,
                    "component_id": image.component_id,
                    "version": image.version,
                    "sha256": image.sha256,
                    "state": state.value,
                    "at": now.isoformat(),
                }
            ],
            "sent_at": now.isoformat(),
        }
    ).model_dump(mode="json")


def test_devices_fetch_signed_assignments_and_report_through_the_api_as_waves_open(
    server: BackgroundServer, tenant: TenantSetup, services: Services, clock: FakeClock
) -> None:
    repo = RealRepo(server, tenant, services)
    image = repo.add("1.0.0")
    first, second = repo.enroll("panel-001"), repo.enroll("panel-002")
    group = tenant.groups["Field Test"].id
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = tenant.client.request_json(
            "POST",
            f"{repo.base}/device-groups/{group}/deployments",
            {"image_ids": [image.id], "waves": ["1", "all"], "window": {"start": "01:00", "end": "04:00"}},
        )
        deployment = json.loads(created)
        assert (deployment["state"], deployment["waves_opened"]) == ("rolling_out", 1)
        assert [wave["size"] for wave in deployment["waves"]] == [1, 1]

        answers = {
            device.device_id: http.get("/updates/v1/assignment", headers=token(device))
            for device in (first, second)
        }
        assert sorted(answer.status_code for answer in answers.values()) == [200, 204]
        [(lead, answer)] = [(device_id, a) for device_id, a in answers.items() if a.status_code == 200]
        verified = verify_assignment(
            answer.content, services.images.root(tenant.id), device_id=lead, now=dt.datetime.now(dt.UTC)
        )
        assert [target.path for target in verified.targets.values()] == [image.target_path]
        assert verified.window is not None
        assert verified.window.to_dict() == {"start": "01:00", "end": "04:00"}

        leader = first if first.device_id == lead else second
        follower = second if leader is first else first
        reported = http.post(
            "/updates/v1/report",
            json=installed(image, deployment["id"], UpdateState.INSTALLED),
            headers=token(leader),
        )
        assert reported.status_code == 200, reported.text
        shown = json.loads(tenant.client.get_bytes(f"{repo.base}/deployments/{deployment['id']}"))
        assert shown["waves_opened"] == 2, "the report opened the next wave at once"
        assert shown["waves"][0]["installed"] == 1
        assert http.get("/updates/v1/assignment", headers=token(follower)).status_code == 200
        clock.advance(1)  # past the judge interval: this report is judged at once too
        http.post(
            "/updates/v1/report",
            json=installed(image, deployment["id"], UpdateState.INSTALLED),
            headers=token(follower),
        )
        listed = json.loads(tenant.client.get_bytes(f"{repo.base}/device-groups/{group}/deployments"))
        assert [(item["id"], item["state"]) for item in listed] == [(deployment["id"], "current")]

        status = json.loads(tenant.client.get_bytes(f"{repo.base}/devices/{follower.device_id}/update"))
        assert (status["state"], status["pending_image_ids"]) == ("installed", [])
        assert status["running"][0]["version"] == "1.0.0"

        assert http.get("/updates/v1/assignment").status_code == 401
        assert (
            http.post("/updates/v1/report", json={"sent_at": "x"}, headers=token(leader)).status_code == 422
        )


def test_deployment_routes_refuse_what_the_service_refuses(
    server: BackgroundServer,
    tenant: TenantSetup,
    services: Services,
    admin: FleetwardClient,
    admin_token: str,
) -> None:
    repo = RealRepo(server, tenant, services)
    image = repo.add("1.0.0")
    other = make_tenant(admin, "other-farm")
    group = tenant.groups["Field Test"].id
    with httpx.Client(base_url=server.url, timeout=30) as http:
        bearer = {"Authorization": f"Bearer {admin_token}"}
        bad_wave = http.post(
            f"{repo.base}/device-groups/{group}/deployments",
            json={"image_ids": [image.id], "waves": ["50%", "10%"]},
            headers=bearer,
        )
        assert (bad_wave.status_code, bad_wave.json()["error"]["code"]) == (400, "invalid_plan")
        created = http.post(
            f"{repo.base}/device-groups/{group}/deployments", json={"image_ids": [image.id]}, headers=bearer
        )
        assert created.status_code == 201, created.text
        deployment_id = created.json()["id"]
        elsewhere = http.get(f"/v1/tenants/{other.id}/deployments/{deployment_id}", headers=bearer)
        assert (elsewhere.status_code, elsewhere.json()["error"]["code"]) == (404, "deployment_not_found")
        nothing = http.post(f"{repo.base}/device-groups/{group}/deployments/revert", headers=bearer)
        assert (nothing.status_code, nothing.json()["error"]["code"]) == (409, "nothing_to_revert")
        aborted = http.post(
            f"{repo.base}/deployments/{deployment_id}/abort", json={"reason": "wrong build"}, headers=bearer
        )
        assert aborted.status_code == 200
        assert aborted.json()["state"] == "aborted"
        again = http.post(f"{repo.base}/deployments/{deployment_id}/abort", headers=bearer)
        assert again.status_code == 409


def test_the_cli_creates_watches_aborts_and_reverts_deployments(
    server: BackgroundServer, tenant: TenantSetup, services: Services, admin_token: str, tmp_path: Path
) -> None:
    repo = RealRepo(server, tenant, services)
    old, new = repo.add("1.0.0"), repo.add("1.1.0")
    device = repo.enroll("panel-001")
    group = tenant.groups["Field Test"].id
    env = {"FLEETWARD_CLI_CONFIG": str(tmp_path / "cli.json")}
    base = ["--url", server.url, "--token", admin_token, "--tenant", tenant.id]

    def run(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli_app, [*base, *args], env=env)
        assert result.exit_code == code, f"{args}: {result.output}{result.exception!r}"
        return result.output

    assert "rolling out in 1 wave(s)" in run("deployment", "create", group, "--image", old.id)
    [first] = json.loads(run("--json", "deployment", "list", group))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post(
            "/updates/v1/report",
            json=installed(old, first["id"], UpdateState.INSTALLED),
            headers=token(device),
        )
    watched = run("deployment", "show", first["id"], "--watch")
    assert "wave 1" in watched
    assert "the rollout is current" in watched

    created = run(
        "--json",
        "deployment",
        "create",
        group,
        "--image",
        new.id,
        "--waves",
        "1,all",
        "--window",
        "01:00-04:00",
        "--soak",
        "600",
        "--crash-factor",
        "3.5",
        "--min-crashes",
        "7",
        "--max-unhealthy",
        "0.1",
    )
    second = json.loads(created)
    assert second["window"] == {"start": "01:00", "end": "04:00"}
    plan = second["plan"]
    assert (plan["crash_rate_factor"], plan["min_crash_reports"], plan["max_unhealthy_fraction"]) == (
        3.5,
        7,
        0.1,
    )
    shown = " ".join(run("deployment", "show", second["id"]).replace("│", " ").split())
    for text in ("soak 600 s", "3.5× the group's rate", "from 7 crash report(s)", "unhealthy abort at 10%"):
        assert text in shown, text
    run(
        "deployment", "create", group, "--image", new.id, "--waves", "ten", code=1
    )  # refused before the request
    assert "aborted" in run("deployment", "abort", second["id"], "--reason", "wrong build")
    status = json.loads(run("--json", "update", "status", device.device_id))
    assert status["deployment_id"] == first["id"], "the abort gave the device the previous deployment again"
    run("deployment", "revert", group, code=1)  # the current one has no earlier one

    third = json.loads(run("--json", "deployment", "create", group, "--image", new.id))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        report = installed(new, third["id"], UpdateState.INSTALLED)
        http.post("/updates/v1/report", json=report, headers=token(device))
    assert "group reverted" in run("deployment", "revert", group)
    assert json.loads(run("--json", "update", "status", device.device_id))["pending_image_ids"] == [old.id]
    assert "aborted" in run("deployment", "show", second["id"])


def test_a_device_not_heard_from_since_its_assignment_is_asked_again_to_check_now(fleet: Fleet) -> None:
    """A "check now" can be lost (the device reconnecting, the method timing out under load): the tick asks
    the devices of a rollout that said nothing since their assignment again, every check_now_retry_seconds,
    and stops once they report."""
    ids = fleet.claim("Field Test", 3)
    image = fleet.images.add(fleet.tenant_id, fleet.product_id, "panel", "1.0.0")
    seconds = [1000.0]
    service = DeploymentService(
        fleet.services.database,
        fleet.clock,
        fleet.services.settings.limits,
        fleet.images,
        monotonic=lambda: seconds[0],
    )
    created = service.create(
        fleet.admin, fleet.tenant_id, fleet.groups["Field Test"].id, [image.id], waves("all")
    )
    asyncio.run(service.check_now(FakeNudger()))  # the first ask, as the wave opened
    service.tick()  # starts counting
    seconds[0] += 29
    service.tick()
    assert asyncio.run(service.check_now(FakeNudger())) == 0, "not yet: 29 s of the 30"
    fleet.report(sorted(ids)[0], created.id, image, UpdateState.DOWNLOADING)  # this one was heard from
    seconds[0] += 2
    service.tick()
    nudger = FakeNudger()
    assert asyncio.run(service.check_now(nudger)) == 2
    assert {device for _tenant, device in nudger.nudged} == set(sorted(ids)[1:])
    service.tick()
    assert asyncio.run(service.check_now(FakeNudger())) == 0, "and not again before another 30 s"
