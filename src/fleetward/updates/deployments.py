"""Deployments, the rollouts that stop themselves, and the director (ADR 0015).

A **deployment** is a set of images (one per component, all of the group's product) for a device group.
A group has at most one deployment ``rolling_out`` and one ``current`` (the last that completed); a new
rollout starts from the current one, its ``previous``. The rollout reaches the group's devices in waves
(``rollout.plan_waves``); each device's assignment is its row in ``device_updates``: which deployment, in
which wave, with which assignment version, and where the device says it is.

:meth:`DeploymentService.tick` judges every rollout in progress (``rollout.judge``) and acts: it opens the
next wave, completes the rollout (the deployment becomes current), or aborts it (every device it reached is
assigned the previous deployment again: the rollback). Each change of a rollout is a compare-and-set on
the deployment's row, so several server processes may tick at once and only one acts. The tick also hands
the group's current deployment to its new members.

The **director** (:meth:`DeploymentService.assignment_for`) signs, for a device that asks, the TUF targets
of the deployment it is in now, filtered by its group's update policy; the assignment's version is the
device's ``assignment_version``, which only ever grows.

Whoever opens a wave queues it for "check now" (``check_now.py``); :meth:`DeploymentService.check_now`
sends those nudges, from the API's background task or right after a request.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import sqlalchemy as sa
from securesystemslib.signer import Signer
from sqlalchemy.engine import Connection, Row
from tuf.api.metadata import TargetFile

from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import Conflict, FleetwardError, InvalidInput, NotFound
from fleetward.registry.access import Principal
from fleetward.registry.models import DeviceGroup, DeviceStatus, OsFeed, Scope, UpdatePolicy
from fleetward.registry.service import group_in
from fleetward.store import events as event_log
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import deployments, device_groups, device_reports, device_updates, devices
from fleetward.updates import rollout as core
from fleetward.updates.check_now import Nudger, OpenedWave
from fleetward.updates.check_now import check_now as nudge_all
from fleetward.updates.models import Image
from fleetward.wire.updates import (
    MAX_ASSIGNMENT_BYTES,
    MAX_COMPONENTS,
    CheckRefusal,
    MaintenanceWindow,
    UpdateState,
    VersionReport,
    assignment,
)

logger = logging.getLogger(__name__)

CRASH_KINDS = ("crash", "crash_loop")
UNHEALTHY_KINDS = ("crash_loop", "launch_refused")
#: opened waves waiting for their "check now", per process (older ones are dropped: devices poll anyway)
MAX_PENDING_NUDGES = 1024
#: signed assignments each process keeps
ASSIGNMENT_CACHE = 4096
#: images each process keeps (an image never changes once published)
IMAGE_CACHE = 4096
UNASSIGNED = "unassigned"
#: the longest message kept for a device's update state
MAX_MESSAGE_CHARS = 2048
#: how the message of a device whose last check refused what it was given starts
REFUSED = "the device refused its last check: "


class ImageSource(Protocol):
    """What deployments need of the image repository (``updates.images.ImageService`` is the real one)."""

    def image(self, tenant_id: str, image_id: str) -> Image: ...

    def director_signer(self, tenant_id: str) -> Signer: ...

    def target_file(self, tenant_id: str, image: Image) -> TargetFile: ...


class UpdatingDevice(Protocol):
    """A device that asks the director (``api.device_auth.UpdateDevice`` is one)."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def device_id(self) -> str: ...


class DeploymentState(StrEnum):
    ROLLING_OUT = "rolling_out"
    CURRENT = "current"
    SUPERSEDED = "superseded"
    ABORTED = "aborted"
    REVERTED = "reverted"


@dataclass(frozen=True)
class Deployment:
    """A deployment, its plan, and how its rollout went (per wave)."""

    id: str
    tenant_id: str
    group_id: str
    image_ids: tuple[str, ...]
    previous_id: str | None
    state: DeploymentState
    plan: core.RolloutPlan
    window: MaintenanceWindow | None
    waves_opened: int
    wave_sizes: tuple[int, ...]
    waves: tuple[core.WaveCounts, ...]
    #: the last verdict, or why it was aborted or reverted
    reason: str
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None


@dataclass(frozen=True)
class DeviceUpdateStatus:
    """Where one device is: the deployment it must run, what it runs, what is pending, and why it failed."""

    device_id: str
    group_id: str | None
    deployment_id: str | None
    wave: int | None
    assignment_version: int
    state: str
    code: str | None
    message: str
    bytes_downloaded: int
    bytes_saved: int
    #: what it reported running: (component id, version, sha256)
    running: tuple[tuple[str, str, str], ...]
    #: assigned images it does not run yet
    pending_image_ids: tuple[str, ...]
    assigned_at: dt.datetime | None
    reported_at: dt.datetime | None


@dataclass(frozen=True)
class TickOutcome:
    opened: tuple[OpenedWave, ...] = ()
    completed: tuple[str, ...] = ()
    aborted: tuple[str, ...] = ()
    new_members: int = 0


@dataclass(frozen=True)
class _Rollout:
    """The ``rollout`` column: the plan and the progress of the rollout (JSON)."""

    plan: core.RolloutPlan
    waves: tuple[tuple[str, ...], ...]
    opened: int
    started_at: dt.datetime
    baseline: core.CrashBaseline
    window: MaintenanceWindow | None = None
    revision: int = 0
    completed_at: dt.datetime | None = None
    #: the counts per wave when the rollout ended (its devices may be assigned elsewhere since)
    final: tuple[core.WaveCounts, ...] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "revision": self.revision,
                "plan": self.plan.to_dict(),
                "waves": [list(wave) for wave in self.waves],
                "opened": self.opened,
                "started_at": self.started_at.isoformat(),
                "baseline": {
                    "crashes": self.baseline.crashes,
                    "device_seconds": self.baseline.device_seconds,
                },
                "window": self.window.to_dict() if self.window else None,
                "completed_at": self.completed_at.isoformat() if self.completed_at else None,
                "final": None if self.final is None else [counts.__dict__ for counts in self.final],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> _Rollout:
        data = json.loads(text)
        completed = data.get("completed_at")
        final = data.get("final")
        return cls(
            revision=int(data["revision"]),
            plan=core.RolloutPlan.from_dict(data["plan"]),
            waves=tuple(tuple(wave) for wave in data["waves"]),
            opened=int(data["opened"]),
            started_at=dt.datetime.fromisoformat(data["started_at"]),
            baseline=core.CrashBaseline(
                int(data["baseline"]["crashes"]), float(data["baseline"]["device_seconds"])
            ),
            window=MaintenanceWindow.from_dict(data["window"]) if data.get("window") else None,
            completed_at=dt.datetime.fromisoformat(completed) if completed else None,
            final=None if final is None else tuple(core.WaveCounts(**counts) for counts in final),
        )

    @property
    def wave_sizes(self) -> tuple[int, ...]:
        return tuple(len(wave) for wave in self.waves)


def _new_id() -> str:
    return str(uuid.uuid4())


def _state_of(text: str) -> core.DeviceState:
    try:
        return core.DeviceState(text)
    except ValueError:
        return core.DeviceState.ASSIGNED


class DeploymentService:
    """Deployments of device groups, their rollouts, and the director's assignments."""

    def __init__(
        self,
        database: Database,
        clock: Clock,
        limits: Limits,
        images: ImageSource,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = database
        self._clock = clock
        #: when this process last asked each unheard device to check now (its own clock: a fake clock
        #: that stands still must not stop the retries)
        self._monotonic = monotonic
        self._last_nudged: dict[tuple[str, str], float] = {}
        self._limits = limits
        self._images = images
        self._lock = threading.Lock()
        self._pending: collections.deque[OpenedWave] = collections.deque(maxlen=MAX_PENDING_NUDGES)
        self._signed: collections.OrderedDict[tuple[object, ...], tuple[bytes, dt.datetime]] = (
            collections.OrderedDict()
        )
        self._image_cache: collections.OrderedDict[tuple[str, str], Image] = collections.OrderedDict()
        # reports judge a rollout at most once per interval: when each was last judged, and those reported
        # on since (judged by :meth:`judge_reported` once their interval is over, or by the tick)
        self._judge_interval = dt.timedelta(milliseconds=limits.rollout_judge_interval_milliseconds)
        self._judged_at: dict[tuple[str, str], dt.datetime] = {}
        self._reported: set[tuple[str, str]] = set()
        #: how many times this process judged a rollout (each reads every device the rollout reached)
        self.judgements = 0

    # ---------------------------------------------------------------- operators

    def create(
        self,
        principal: Principal,
        tenant_id: str,
        group_id: str,
        image_ids: Sequence[str],
        plan: core.RolloutPlan | None = None,
        window: MaintenanceWindow | None = None,
    ) -> Deployment:
        """Start rolling out ``image_ids`` to the group: its first wave is assigned at once.

        Refused for a NoUpdates group, for images of another product, for two images of one component,
        for images the group's update policy filters out, for agent images a Retail group would get
        before an OS-evaluation group of its product has, and while another rollout of the group runs.
        """
        principal.require(tenant_id, Scope.WRITE)
        plan = plan or core.RolloutPlan()
        wanted = list(dict.fromkeys(image_ids))
        if not wanted:
            raise InvalidInput("a deployment names at least one image", code="no_images")
        if len(wanted) > MAX_COMPONENTS:
            raise InvalidInput(f"a deployment names at most {MAX_COMPONENTS} images", code="too_many_images")
        found = self._images_of(tenant_id, wanted)
        now = self._clock.now()
        with self._db.write() as connection:
            group = group_in(connection, tenant_id, group_id)
            self._check_images(connection, group, found)
            if self._latest(connection, group.id, DeploymentState.ROLLING_OUT) is not None:
                raise Conflict(
                    "a rollout of this group is in progress: abort it first", code="rollout_in_progress"
                )
            previous = self._latest(connection, group.id, DeploymentState.CURRENT)
            deployment_id = _new_id()
            members = self._members(connection, tenant_id, group.id)
            record = _Rollout(
                plan=plan,
                waves=core.plan_waves(members, plan, seed=deployment_id),
                opened=1,
                started_at=now,
                baseline=self._baseline(connection, tenant_id, group.id, len(members), now),
                window=window,
            )
            connection.execute(
                deployments.insert().values(
                    id=deployment_id,
                    tenant_id=tenant_id,
                    group_id=group.id,
                    image_ids=json.dumps(wanted),
                    previous_id=previous.id if previous is not None else None,
                    state=DeploymentState.ROLLING_OUT.value,
                    rollout=record.to_json(),
                    reason="",
                    created_by=principal.email,
                    created_at=now,
                    updated_at=now,
                )
            )
            opened = self._open_wave(connection, tenant_id, group.id, deployment_id, record, 0, now)
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="deployment",
                        code="created",
                        detail=f"deployment {deployment_id} of {len(wanted)} image(s) to group {group.name}: "
                        f"{len(record.waves)} wave(s), {len(opened.device_ids)} device(s) in the first",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            created = self._deployment(connection, self._row(connection, tenant_id, deployment_id), now)
        self._queue([opened])
        return created

    def _check_images(self, connection: Connection, group: DeviceGroup, images: Sequence[Image]) -> None:
        if group.update_policy is UpdatePolicy.NO_UPDATES:
            raise Conflict(
                f"the group {group.name} takes no updates (its policy is NoUpdates)", code="group_no_updates"
            )
        components: set[str] = set()
        for image in images:
            if image.product_id != group.product_id:
                raise InvalidInput(
                    f"image {image.id} belongs to another product than the group", code="image_other_product"
                )
            if image.component_id in components:
                raise InvalidInput(
                    f"two images of component {image.component_id}: a deployment names one per component",
                    code="component_twice",
                )
            components.add(image.component_id)
        allowed = core.assignable(images, group)
        refused = [image for image in images if image not in allowed]
        if refused:
            raise InvalidInput(
                f"the group's policy {group.update_policy.value} takes only agent images, not "
                + ", ".join(f"{image.component_id} {image.version}" for image in refused),
                code="policy_refuses",
            )
        waiting = core.awaiting_evaluation(images, group, self._evaluated(connection, group))
        if waiting:
            raise Conflict(
                "an OS-evaluation group of the product must complete a rollout of "
                + ", ".join(f"{image.component_id} {image.version}" for image in waiting)
                + " before a Retail group gets it",
                code="os_evaluation_first",
            )

    def _evaluated(self, connection: Connection, group: DeviceGroup) -> set[str]:
        """The images some OS-evaluation group of the product completed a rollout of."""
        rows = connection.execute(
            sa.select(deployments.c.image_ids)
            .join(device_groups, device_groups.c.id == deployments.c.group_id)
            .where(
                deployments.c.tenant_id == group.tenant_id,
                device_groups.c.product_id == group.product_id,
                device_groups.c.os_feed == OsFeed.RETAIL_EVAL.value,
                deployments.c.state.in_([DeploymentState.CURRENT.value, DeploymentState.SUPERSEDED.value]),
            )
        )
        return {image_id for row in rows for image_id in json.loads(row.image_ids)}

    def list_deployments(
        self, principal: Principal, tenant_id: str, group_id: str, *, limit: int = 50
    ) -> list[Deployment]:
        """The group's deployments, newest first: its history."""
        principal.require(tenant_id, Scope.READ)
        limit = max(1, min(limit, self._limits.max_list_items))
        now = self._clock.now()
        with self._db.read() as connection:
            group = group_in(connection, tenant_id, group_id)
            rows = connection.execute(
                sa.select(deployments)
                .where(deployments.c.tenant_id == tenant_id, deployments.c.group_id == group.id)
                .order_by(deployments.c.created_at.desc(), deployments.c.id)
                .limit(limit)
            ).all()
            return [self._deployment(connection, row, now) for row in rows]

    def get(self, principal: Principal, tenant_id: str, deployment_id: str) -> Deployment:
        principal.require(tenant_id, Scope.READ)
        now = self._clock.now()
        with self._db.read() as connection:
            return self._deployment(connection, self._row(connection, tenant_id, deployment_id), now)

    def abort(self, principal: Principal, tenant_id: str, deployment_id: str, reason: str = "") -> Deployment:
        """Stop a rollout in progress: the devices it reached get the previous deployment again."""
        principal.require(tenant_id, Scope.WRITE)
        reason = reason.strip()[: self._limits.max_description_chars]
        now = self._clock.now()
        with self._db.write() as connection:
            row = self._row(connection, tenant_id, deployment_id)
            if row.state != DeploymentState.ROLLING_OUT.value:
                raise Conflict(f"the deployment is {row.state}, not rolling out", code="not_rolling_out")
            why = f"aborted by {principal.email}" + (f": {reason}" if reason else "")
            opened = self._abort(connection, row, _Rollout.from_json(row.rollout), why, now, principal.email)
            aborted = self._deployment(connection, self._row(connection, tenant_id, deployment_id), now)
        self._queue(opened)
        return aborted

    def revert(self, principal: Principal, tenant_id: str, group_id: str) -> Deployment:
        """Give the whole group the images of the deployment before its newest one, at once.

        The newest (rolling out or current) becomes ``reverted``; the new deployment is current.
        """
        principal.require(tenant_id, Scope.WRITE)
        now = self._clock.now()
        with self._db.write() as connection:
            group = group_in(connection, tenant_id, group_id)
            newest = self._latest(connection, group.id, DeploymentState.ROLLING_OUT) or self._latest(
                connection, group.id, DeploymentState.CURRENT
            )
            if newest is None or newest.previous_id is None:
                raise Conflict("the group has no earlier deployment to revert to", code="nothing_to_revert")
            target = self._row(connection, tenant_id, newest.previous_id)
            deployment_id = _new_id()
            members = self._members(connection, tenant_id, group.id)
            plan = core.RolloutPlan()
            record = _Rollout(
                plan=plan,
                waves=core.plan_waves(members, plan, seed=deployment_id),
                opened=1,
                started_at=now,
                baseline=core.CrashBaseline(),
                window=_Rollout.from_json(target.rollout).window,
                completed_at=now,
            )
            newest_record = _Rollout.from_json(newest.rollout)
            self._end(
                connection,
                newest,
                newest_record,
                DeploymentState.REVERTED,
                f"reverted by {principal.email}",
                now,
            )
            connection.execute(
                deployments.update()
                .where(
                    deployments.c.group_id == group.id,
                    deployments.c.state == DeploymentState.CURRENT.value,
                )
                .values(state=DeploymentState.SUPERSEDED.value, updated_at=now)
            )
            connection.execute(
                deployments.insert().values(
                    id=deployment_id,
                    tenant_id=tenant_id,
                    group_id=group.id,
                    image_ids=target.image_ids,
                    previous_id=newest.id,
                    state=DeploymentState.CURRENT.value,
                    rollout=record.to_json(),
                    reason=f"revert of {newest.id} to the images of {target.id}",
                    created_by=principal.email,
                    created_at=now,
                    updated_at=now,
                )
            )
            opened = self._open_wave(connection, tenant_id, group.id, deployment_id, record, 0, now)
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="deployment",
                        code="reverted",
                        detail=f"group {group.name} reverted from {newest.id} to the images of {target.id} "
                        f"({len(opened.device_ids)} device(s))",
                        severity=Severity.WARNING,
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
            created = self._deployment(connection, self._row(connection, tenant_id, deployment_id), now)
        self._queue([opened])
        return created

    def device_status(self, principal: Principal, tenant_id: str, device_id: str) -> DeviceUpdateStatus:
        """The device's update: what it must run, what it runs, what is pending, and why it failed."""
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            device = connection.execute(
                sa.select(devices.c.id, devices.c.group_id).where(
                    devices.c.tenant_id == tenant_id, devices.c.id == device_id
                )
            ).first()
            if device is None:
                raise NotFound("no such device in this tenant", code="device_not_found")
            row = connection.execute(
                sa.select(device_updates).where(
                    device_updates.c.tenant_id == tenant_id, device_updates.c.device_id == device_id
                )
            ).first()
            image_ids: list[str] = []
            if row is not None and row.deployment_id is not None:
                deployment = self._row(connection, tenant_id, row.deployment_id)
                image_ids = json.loads(deployment.image_ids)
        running = tuple(
            (item["component_id"], item["version"], item["sha256"])
            for item in (json.loads(row.components) if row is not None else [])
        )
        have = {(component, sha256) for component, _version, sha256 in running}
        pending = tuple(
            image.id
            for image in self._images_of(tenant_id, image_ids)
            if (image.component_id, image.sha256) not in have
        )
        if row is None:
            return DeviceUpdateStatus(
                device_id, device.group_id, None, None, 0, UNASSIGNED, None, "", 0, 0, (), (), None, None
            )
        return DeviceUpdateStatus(
            device_id=device_id,
            group_id=device.group_id,
            deployment_id=row.deployment_id,
            wave=row.wave,
            assignment_version=row.assignment_version,
            state=row.state,
            code=row.code,
            message=row.message,
            bytes_downloaded=row.bytes_downloaded,
            bytes_saved=row.bytes_saved,
            running=running,
            pending_image_ids=pending,
            assigned_at=row.assigned_at,
            reported_at=row.reported_at,
        )

    # ---------------------------------------------------------------- the rollouts' clock

    def tick(self, tenant_id: str | None = None) -> TickOutcome:
        """Judge every rollout in progress (of one tenant, or all) and act; hand new group members their
        group's current deployment. Safe to run in several processes at once."""
        now = self._clock.now()
        with self._db.read() as connection:
            statement = sa.select(deployments.c.id, deployments.c.tenant_id).where(
                deployments.c.state.in_([DeploymentState.ROLLING_OUT.value, DeploymentState.CURRENT.value])
            )
            if tenant_id is not None:
                statement = statement.where(deployments.c.tenant_id == tenant_id)
            live = connection.execute(statement.order_by(deployments.c.created_at)).all()
        with self._lock:
            for item in live:
                self._judged_at[(item.tenant_id, item.id)] = now
                self._reported.discard((item.tenant_id, item.id))
            if tenant_id is None:  # forget the rollouts that ended
                known = {(item.tenant_id, item.id) for item in live}
                self._judged_at = {key: at for key, at in self._judged_at.items() if key in known}
                self._reported &= known
        opened: list[OpenedWave] = []
        completed: list[str] = []
        aborted: list[str] = []
        new_members = 0
        for item in live:
            try:
                outcome = self._judge(item.tenant_id, item.id, now)
                waves, joined = self._welcome(item.tenant_id, item.id, now)
            except Conflict as error:  # another process got there first
                logger.debug("rollout %s: %s", item.id, error)
                continue
            opened += [*outcome.opened, *waves]
            completed += outcome.completed
            aborted += outcome.aborted
            new_members += joined
        self._queue(opened)
        self._queue(self._unheard(live))
        return TickOutcome(tuple(opened), tuple(completed), tuple(aborted), new_members)

    def _unheard(self, live: Sequence[Row[Any, Any]]) -> list[OpenedWave]:
        """Devices of rollouts in progress not heard from since they were assigned, asked to check now
        again every ``check_now_retry_seconds`` (a "check now" can be lost: a device reconnecting, a
        method timing out under load); the first time this process sees one, it only starts counting."""
        rolling = [(item.tenant_id, item.id) for item in live]
        if not rolling:
            self._last_nudged.clear()
            return []
        with self._db.read() as connection:
            rows = connection.execute(
                sa.select(
                    device_updates.c.tenant_id, device_updates.c.device_id, device_updates.c.deployment_id
                )
                .where(
                    device_updates.c.deployment_id.in_([deployment_id for _tenant, deployment_id in rolling]),
                    device_updates.c.state == core.DeviceState.ASSIGNED.value,
                )
                .limit(self._limits.check_now_concurrency * 8)
            ).all()
        now = self._monotonic()
        retry = self._limits.check_now_retry_seconds
        due: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        with self._lock:
            waiting = {(row.tenant_id, row.device_id) for row in rows}
            self._last_nudged = {key: at for key, at in self._last_nudged.items() if key in waiting}
            for row in rows:
                key = (row.tenant_id, row.device_id)
                last = self._last_nudged.setdefault(key, now)
                if now - last >= retry:
                    self._last_nudged[key] = now
                    due[(row.tenant_id, row.deployment_id)].append(row.device_id)
        return [
            OpenedWave(tenant_id, deployment_id, -1, tuple(device_ids))
            for (tenant_id, deployment_id), device_ids in due.items()
        ]

    def _judge(self, tenant_id: str, deployment_id: str, now: dt.datetime) -> TickOutcome:
        """One rollout: judge it (reading), then, unless it holds, judge it again and act in one write
        transaction guarded by a compare-and-set."""
        with self._lock:
            self.judgements += 1
        with self._db.read() as connection:
            row = self._row(connection, tenant_id, deployment_id)
            if row.state != DeploymentState.ROLLING_OUT.value:
                return TickOutcome()
            record = _Rollout.from_json(row.rollout)
            verdict = core.judge(record.plan, self._progress(connection, row, record), now)
        if verdict.decision is core.Decision.HOLD:
            return TickOutcome()
        with self._db.write() as connection:
            row = self._row(connection, tenant_id, deployment_id)
            if row.state != DeploymentState.ROLLING_OUT.value:
                return TickOutcome()
            record = _Rollout.from_json(row.rollout)
            verdict = core.judge(record.plan, self._progress(connection, row, record), now)
            if verdict.decision is core.Decision.HOLD:
                return TickOutcome()
            if verdict.decision is core.Decision.ABORT:
                opened = self._abort(
                    connection, row, record, f"aborted ({verdict.code}): {verdict.reason}", now
                )
                return TickOutcome(opened=tuple(opened), aborted=(row.id,))
            if verdict.decision is core.Decision.OPEN_NEXT:
                advanced = replace(record, opened=record.opened + 1, revision=record.revision + 1)
                self._swap(connection, row, advanced, verdict.reason, now)
                wave = self._open_wave(
                    connection, tenant_id, row.group_id, row.id, advanced, record.opened, now
                )
                self._event(
                    connection, row, "wave_opened", f"wave {record.opened + 1} opened: {verdict.reason}", now
                )
                return TickOutcome(opened=(wave,))
            final = self._counts(connection, row, record, now)
            done = replace(record, revision=record.revision + 1, completed_at=now, final=final)
            self._swap(connection, row, done, verdict.reason, now, state=DeploymentState.CURRENT)
            connection.execute(
                deployments.update()
                .where(
                    deployments.c.group_id == row.group_id,
                    deployments.c.state == DeploymentState.CURRENT.value,
                    deployments.c.id != row.id,
                )
                .values(state=DeploymentState.SUPERSEDED.value, updated_at=now)
            )
            self._event(connection, row, "completed", verdict.reason, now)
            return TickOutcome(completed=(row.id,))

    def _abort(
        self,
        connection: Connection,
        row: Row[Any],
        record: _Rollout,
        reason: str,
        now: dt.datetime,
        actor: str | None = None,
    ) -> list[OpenedWave]:
        """End the rollout and give every device it reached the previous deployment (or nothing)."""
        self._end(connection, row, record, DeploymentState.ABORTED, reason, now)
        outcomes = {
            r.device_id: r
            for r in connection.execute(
                sa.select(
                    device_updates.c.device_id,
                    device_updates.c.state,
                    device_updates.c.code,
                    device_updates.c.message,
                ).where(device_updates.c.tenant_id == row.tenant_id, device_updates.c.deployment_id == row.id)
            )
        }
        reached = list(outcomes)
        previous = None
        if row.previous_id is not None:
            candidate = self._row(connection, row.tenant_id, row.previous_id)
            previous = candidate if candidate.state == DeploymentState.CURRENT.value else None
        self._assign(connection, row.tenant_id, reached, previous.id if previous else None, None, now)
        # each device keeps why: the abort, and how the aborted deployment went on it
        for device_id, outcome in outcomes.items():
            own = f"{outcome.state}" + (f" ({outcome.code}): {outcome.message}" if outcome.code else "")
            connection.execute(
                device_updates.update()
                .where(device_updates.c.tenant_id == row.tenant_id, device_updates.c.device_id == device_id)
                .values(
                    code="rollout_aborted",
                    message=f"deployment {row.id} was aborted: {reason}; on this device it was {own}"[
                        :MAX_MESSAGE_CHARS
                    ],
                )
            )
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="deployment",
                    code="aborted",
                    detail=f"deployment {row.id} {reason}; {len(reached)} device(s) "
                    + (f"assigned {previous.id} again" if previous else "left with no assignment"),
                    severity=Severity.WARNING,
                    tenant_id=row.tenant_id,
                    actor=actor,
                )
            ],
        )
        if previous is None or not reached:
            return []
        return [OpenedWave(row.tenant_id, previous.id, 0, tuple(reached))]

    def _end(
        self,
        connection: Connection,
        row: Row[Any],
        record: _Rollout,
        state: DeploymentState,
        reason: str,
        now: dt.datetime,
    ) -> None:
        final = self._counts(connection, row, record, now)
        ended = replace(record, revision=record.revision + 1, final=final)
        self._swap(connection, row, ended, reason, now, state=state)

    def _swap(
        self,
        connection: Connection,
        row: Row[Any],
        record: _Rollout,
        reason: str,
        now: dt.datetime,
        *,
        state: DeploymentState | None = None,
    ) -> None:
        """Compare-and-set the deployment's rollout: ``Conflict`` if another process changed it first."""
        result = connection.execute(
            deployments.update()
            .where(
                deployments.c.id == row.id,
                deployments.c.state == row.state,
                deployments.c.rollout == row.rollout,
            )
            .values(
                rollout=record.to_json(),
                reason=reason[:2000],
                state=(state.value if state else row.state),
                updated_at=now,
            )
        )
        if result.rowcount != 1:
            raise Conflict("the rollout changed meanwhile", code="rollout_changed")

    def _welcome(self, tenant_id: str, deployment_id: str, now: dt.datetime) -> tuple[list[OpenedWave], int]:
        """Assign a current deployment to the group's devices that have none of the group's deployments
        (new members; devices moved in). Devices a rollout already reached keep that rollout's."""
        with self._db.read() as connection:
            if not self._newcomers(connection, tenant_id, deployment_id):
                return [], 0
        with self._db.write() as connection:
            row = self._row(connection, tenant_id, deployment_id)
            newcomers = self._newcomers(connection, tenant_id, deployment_id)
            if not newcomers:
                return [], 0
            record = _Rollout.from_json(row.rollout)
            self._assign(connection, tenant_id, newcomers, row.id, len(record.waves) - 1, now)
        return [OpenedWave(tenant_id, row.id, len(record.waves) - 1, tuple(newcomers))], len(newcomers)

    def _newcomers(self, connection: Connection, tenant_id: str, deployment_id: str) -> list[str]:
        row = self._row(connection, tenant_id, deployment_id)
        if row.state != DeploymentState.CURRENT.value:
            return []
        rolling = self._latest(connection, row.group_id, DeploymentState.ROLLING_OUT)
        keep = [row.id] + ([rolling.id] if rolling is not None else [])
        return [
            found.id
            for found in connection.execute(
                sa.select(devices.c.id)
                .select_from(devices.outerjoin(device_updates, device_updates.c.device_id == devices.c.id))
                .where(
                    devices.c.tenant_id == tenant_id,
                    devices.c.group_id == row.group_id,
                    # a quarantined device too: an update is how it is remediated
                    devices.c.status != DeviceStatus.REVOKED.value,
                    sa.or_(
                        device_updates.c.device_id.is_(None),
                        device_updates.c.deployment_id.is_(None),
                        device_updates.c.deployment_id.not_in(keep),
                    ),
                )
                .limit(self._limits.max_list_items)
            )
        ]

    def _open_wave(
        self,
        connection: Connection,
        tenant_id: str,
        group_id: str,
        deployment_id: str,
        record: _Rollout,
        wave: int,
        now: dt.datetime,
    ) -> OpenedWave:
        """Assign the deployment to the devices of ``wave`` still in the group."""
        planned = record.waves[wave]
        still = set(self._members(connection, tenant_id, group_id))
        reached = [device_id for device_id in planned if device_id in still]
        self._assign(connection, tenant_id, reached, deployment_id, wave, now)
        return OpenedWave(tenant_id, deployment_id, wave, tuple(reached))

    def _assign(
        self,
        connection: Connection,
        tenant_id: str,
        device_ids: Sequence[str],
        deployment_id: str | None,
        wave: int | None,
        now: dt.datetime,
    ) -> None:
        """Point the devices at ``deployment_id``: each one's assignment version grows by one."""
        state = core.DeviceState.ASSIGNED.value if deployment_id else UNASSIGNED
        fresh = {
            "deployment_id": deployment_id,
            "wave": wave,
            "state": state,
            "code": None,
            "message": "",
            "bytes_downloaded": 0,
            "bytes_saved": 0,
            "assigned_at": now,
            "reported_at": None,
        }
        for start in range(0, len(device_ids), 500):
            chunk = list(device_ids[start : start + 500])
            existing = {
                r.device_id
                for r in connection.execute(
                    sa.select(device_updates.c.device_id).where(
                        device_updates.c.tenant_id == tenant_id, device_updates.c.device_id.in_(chunk)
                    )
                )
            }
            if existing:
                connection.execute(
                    device_updates.update()
                    .where(device_updates.c.device_id.in_(existing), device_updates.c.tenant_id == tenant_id)
                    .values(assignment_version=device_updates.c.assignment_version + 1, **fresh)
                )
            new = [device_id for device_id in chunk if device_id not in existing]
            if new:
                connection.execute(
                    device_updates.insert(),
                    [
                        {"tenant_id": tenant_id, "device_id": device_id, "assignment_version": 1, **fresh}
                        for device_id in new
                    ],
                )

    # ---------------------------------------------------------------- progress

    def _progress(self, connection: Connection, row: Row[Any], record: _Rollout) -> core.RolloutProgress:
        crashes: dict[str, int] = collections.Counter()
        unhealthy: set[str] = set()
        for found in connection.execute(
            sa.select(device_reports.c.device_id, device_reports.c.kind, sa.func.count().label("n"))
            .join(device_updates, device_updates.c.device_id == device_reports.c.device_id)
            .where(
                device_updates.c.tenant_id == row.tenant_id,
                device_updates.c.deployment_id == row.id,
                device_reports.c.tenant_id == row.tenant_id,
                device_reports.c.received_at >= device_updates.c.assigned_at,
                device_reports.c.kind.in_(CRASH_KINDS + UNHEALTHY_KINDS),
            )
            .group_by(device_reports.c.device_id, device_reports.c.kind)
        ):
            if found.kind in CRASH_KINDS:
                crashes[found.device_id] += found.n
            if found.kind in UNHEALTHY_KINDS:
                unhealthy.add(found.device_id)
        reached = tuple(
            core.DeviceProgress(
                device_id=found.device_id,
                wave=found.wave if found.wave is not None else len(record.waves) - 1,
                state=_state_of(found.state),
                assigned_at=found.assigned_at,
                reported_at=found.reported_at,
                crashes=crashes.get(found.device_id, 0),
                unhealthy=found.device_id in unhealthy,
            )
            for found in connection.execute(
                sa.select(
                    device_updates.c.device_id,
                    device_updates.c.wave,
                    device_updates.c.state,
                    device_updates.c.assigned_at,
                    device_updates.c.reported_at,
                ).where(device_updates.c.tenant_id == row.tenant_id, device_updates.c.deployment_id == row.id)
            )
        )
        return core.RolloutProgress(
            waves_opened=record.opened,
            wave_sizes=record.wave_sizes,
            devices=reached,
            baseline=record.baseline,
        )

    def _counts(
        self, connection: Connection, row: Row[Any], record: _Rollout, now: dt.datetime
    ) -> tuple[core.WaveCounts, ...]:
        if record.final is not None:
            return record.final
        progress = self._progress(connection, row, record)
        return core.count_waves(progress, record.plan.report_timeout_seconds, now)

    def _baseline(
        self, connection: Connection, tenant_id: str, group_id: str, members: int, now: dt.datetime
    ) -> core.CrashBaseline:
        """The group's crash reports over the baseline period before the rollout."""
        seconds = self._limits.rollout_crash_baseline_seconds
        crashes = connection.execute(
            sa.select(sa.func.count())
            .select_from(device_reports.join(devices, devices.c.id == device_reports.c.device_id))
            .where(
                device_reports.c.tenant_id == tenant_id,
                devices.c.group_id == group_id,
                device_reports.c.kind.in_(CRASH_KINDS),
                device_reports.c.received_at >= now - dt.timedelta(seconds=seconds),
                device_reports.c.received_at < now,
            )
        ).scalar_one()
        return core.CrashBaseline(int(crashes), float(members * seconds))

    # ---------------------------------------------------------------- the director

    def assignment_for(self, device: UpdatingDevice) -> bytes | None:
        """The signed assignment of what the device must run now, or ``None`` when nothing is assigned
        (no deployment, a NoUpdates group, or a device outside the group its deployment is for)."""
        now = self._clock.now()
        found = self._assigned(device)
        if found is None:
            self._welcome_device(device, now)
            found = self._assigned(device)
            if found is None:
                return None
        deployment, version, group = found
        images = core.assignable(self._images_of(device.tenant_id, deployment.image_ids), group)
        if not images:
            return None
        key = (device.device_id, deployment.id, version, tuple(image.id for image in images))
        ttl = dt.timedelta(seconds=self._limits.assignment_ttl_seconds)
        with self._lock:
            cached = self._signed.get(key)
            if cached is not None and cached[1] - now > ttl / 2:
                self._signed.move_to_end(key)
                return cached[0]
        targets = {}
        for image in images:
            target = self._images.target_file(device.tenant_id, image)
            targets[target.path] = target
        expires = now + ttl
        metadata = assignment(
            device.device_id,
            deployment.id,
            targets,
            version=version,
            expires=expires,
            window=deployment.window,
        )
        metadata.sign(self._images.director_signer(device.tenant_id))
        data = metadata.to_bytes()
        if len(data) > MAX_ASSIGNMENT_BYTES:
            raise Conflict("the assignment is larger than a device accepts", code="assignment_too_large")
        with self._lock:
            self._signed[key] = (data, expires)
            while len(self._signed) > ASSIGNMENT_CACHE:
                self._signed.popitem(last=False)
        return data

    def _assigned(self, device: UpdatingDevice) -> tuple[Deployment, int, DeviceGroup] | None:
        with self._db.read() as connection:
            found = connection.execute(
                sa.select(
                    devices.c.group_id,
                    device_updates.c.deployment_id,
                    device_updates.c.assignment_version,
                )
                .select_from(devices.outerjoin(device_updates, device_updates.c.device_id == devices.c.id))
                .where(devices.c.tenant_id == device.tenant_id, devices.c.id == device.device_id)
            ).first()
            if found is None or found.group_id is None or found.deployment_id is None:
                return None
            row = self._row(connection, device.tenant_id, found.deployment_id)
            if row.group_id != found.group_id:
                return None
            group = group_in(connection, device.tenant_id, row.group_id)
            return self._deployment(connection, row, None), int(found.assignment_version), group

    def _welcome_device(self, device: UpdatingDevice, now: dt.datetime) -> None:
        """A device the tick has not seen yet in its group gets the group's current deployment now."""
        with self._db.read() as connection:
            group_id = connection.execute(
                sa.select(devices.c.group_id).where(
                    devices.c.tenant_id == device.tenant_id, devices.c.id == device.device_id
                )
            ).scalar_one_or_none()
            current = (
                self._latest(connection, group_id, DeploymentState.CURRENT) if group_id is not None else None
            )
        if current is not None:
            try:
                waves, _count = self._welcome(device.tenant_id, current.id, now)
            except Conflict:
                return
            self._queue(waves)

    def record_report(self, device: UpdatingDevice, report: VersionReport) -> TickOutcome:
        """Keep what the device says about its assignment, and judge its rollout again: at once if it was
        not judged within ``rollout_judge_interval_milliseconds``, else by :meth:`judge_reported` once
        that interval is over (or by the tick), so that a burst of reports costs one judge.

        A device whose last check refused what it was given (``report.refusal``) has ``failed`` the
        rollout it is in; its next report without a refusal sets its state from its results again."""
        now = self._clock.now()
        with self._db.write() as connection:
            row = connection.execute(
                sa.select(device_updates).where(
                    device_updates.c.tenant_id == device.tenant_id,
                    device_updates.c.device_id == device.device_id,
                )
            ).first()
            components = json.dumps(
                [item.model_dump(mode="json") for item in report.components], separators=(",", ":")
            )
            if row is None:
                connection.execute(
                    device_updates.insert().values(
                        tenant_id=device.tenant_id,
                        device_id=device.device_id,
                        deployment_id=None,
                        wave=None,
                        assignment_version=0,
                        state=UNASSIGNED,
                        message="",
                        components=components,
                        reported_at=now,
                    )
                )
                return TickOutcome()
            values: dict[str, object] = {"components": components, "reported_at": now}
            deployment_id: str | None = row.deployment_id
            rolling = False
            if deployment_id is not None:
                deployment = self._row(connection, device.tenant_id, deployment_id)
                rolling = deployment.state == DeploymentState.ROLLING_OUT.value
                group = group_in(connection, device.tenant_id, deployment.group_id)
                wanted = core.assignable(
                    self._images_of(device.tenant_id, json.loads(deployment.image_ids)), group
                )
                refusal = report.refusal if rolling else None
                assigned_at: dt.datetime | None = row.assigned_at
                if (
                    refusal is not None
                    and assigned_at is not None
                    and refusal.at < assigned_at - self._refusal_skew
                ):
                    refusal = None  # a refusal of what the device was given before this assignment
                values.update(_device_state(report, deployment_id, wanted, _state_of(row.state), refusal))
                refused_before = row.state == core.DeviceState.FAILED.value and row.message.startswith(
                    REFUSED
                )
                if refused_before and refusal is None and "code" not in values:
                    # it refuses no longer, and its results tell nothing yet
                    values.update(state=core.DeviceState.ASSIGNED.value, code=None, message="")
                installed = core.DeviceState.INSTALLED.value
                if values.get("state") == installed and row.state != installed:
                    # when the device kept it (its results say), not when the report came: it attests
                    # again right after, often before it reports (never later than now: a clock ahead)
                    kept = [
                        result.at
                        for result in report.results
                        if result.deployment_id == deployment_id and result.state is UpdateState.INSTALLED
                    ]
                    values["installed_at"] = min(now, max(kept, default=now))
            connection.execute(
                device_updates.update()
                .where(
                    device_updates.c.device_id == device.device_id,
                    device_updates.c.tenant_id == device.tenant_id,
                    device_updates.c.assignment_version == row.assignment_version,
                )
                .values(**values)
            )
        if (
            not rolling
            or deployment_id is None
            or not self._judge_now((device.tenant_id, deployment_id), now)
        ):
            return TickOutcome()
        try:
            outcome = self._judge(device.tenant_id, deployment_id, now)
        except Conflict:
            return TickOutcome()
        self._queue(list(outcome.opened))
        return outcome

    @property
    def _refusal_skew(self) -> dt.timedelta:
        """How far a device's clock may be behind (its token may be this old): a refusal dated more than
        this before the device's assignment was of what it was given before."""
        return dt.timedelta(seconds=self._limits.device_token_max_age_seconds)

    def _judge_now(self, key: tuple[str, str], now: dt.datetime) -> bool:
        """Whether a report on rollout ``key`` judges it now; if not, it is judged once its interval ends."""
        with self._lock:
            last = self._judged_at.get(key)
            if last is not None and now - last < self._judge_interval:
                self._reported.add(key)
                return False
            self._judged_at[key] = now
            self._reported.discard(key)
            return True

    def judge_reported(self) -> TickOutcome:
        """Judge the rollouts reported on since they were last judged whose interval is over (the API's
        background task calls it every ``rollout_judge_interval_milliseconds``)."""
        now = self._clock.now()
        with self._lock:
            due = [key for key in self._reported if now - self._judged_at[key] >= self._judge_interval]
            for key in due:
                self._reported.discard(key)
                self._judged_at[key] = now
        opened: list[OpenedWave] = []
        completed: list[str] = []
        aborted: list[str] = []
        for tenant_id, deployment_id in due:
            try:
                outcome = self._judge(tenant_id, deployment_id, now)
            except Conflict as error:  # another process got there first
                logger.debug("rollout %s: %s", deployment_id, error)
                continue
            opened += outcome.opened
            completed += outcome.completed
            aborted += outcome.aborted
        self._queue(opened)
        return TickOutcome(tuple(opened), tuple(completed), tuple(aborted))

    # ---------------------------------------------------------------- check now

    def _queue(self, waves: Iterable[OpenedWave]) -> None:
        with self._lock:
            self._pending.extend(wave for wave in waves if wave.device_ids)

    async def check_now(self, nudger: Nudger) -> int:
        """Ask the devices of the waves opened since the last call to check for updates now."""
        with self._lock:
            waves = list(self._pending)
            self._pending.clear()
        return await nudge_all(nudger, waves, concurrency=self._limits.check_now_concurrency)

    # ---------------------------------------------------------------- reading

    def _images_of(self, tenant_id: str, image_ids: Iterable[str]) -> list[Image]:
        """The images, read once per process: an image never changes once published."""
        found: list[Image] = []
        for image_id in image_ids:
            key = (tenant_id, image_id)
            with self._lock:
                image = self._image_cache.get(key)
            if image is None:
                image = self._images.image(tenant_id, image_id)
                with self._lock:
                    self._image_cache[key] = image
                    while len(self._image_cache) > IMAGE_CACHE:
                        self._image_cache.popitem(last=False)
            found.append(image)
        return found

    @staticmethod
    def _row(connection: Connection, tenant_id: str, deployment_id: str) -> Row[Any]:
        row = connection.execute(
            sa.select(deployments).where(
                deployments.c.tenant_id == tenant_id, deployments.c.id == deployment_id
            )
        ).first()
        if row is None:
            raise NotFound("no such deployment in this tenant", code="deployment_not_found")
        return row

    @staticmethod
    def _latest(connection: Connection, group_id: str, state: DeploymentState) -> Row[Any] | None:
        return connection.execute(
            sa.select(deployments)
            .where(deployments.c.group_id == group_id, deployments.c.state == state.value)
            .order_by(deployments.c.created_at.desc())
            .limit(1)
        ).first()

    @staticmethod
    def _members(connection: Connection, tenant_id: str, group_id: str) -> list[str]:
        return [
            row.id
            for row in connection.execute(
                sa.select(devices.c.id).where(
                    devices.c.tenant_id == tenant_id,
                    devices.c.group_id == group_id,
                    devices.c.status != DeviceStatus.REVOKED.value,
                )
            )
        ]

    def _deployment(self, connection: Connection, row: Row[Any], now: dt.datetime | None) -> Deployment:
        """The record of a deployment row; with ``now``, its per-wave progress too."""
        record = _Rollout.from_json(row.rollout)
        waves: tuple[core.WaveCounts, ...] = ()
        if now is not None:
            waves = self._counts(connection, row, record, now)
        return Deployment(
            id=row.id,
            tenant_id=row.tenant_id,
            group_id=row.group_id,
            image_ids=tuple(json.loads(row.image_ids)),
            previous_id=row.previous_id,
            state=DeploymentState(row.state),
            plan=record.plan,
            window=record.window,
            waves_opened=record.opened,
            wave_sizes=record.wave_sizes,
            waves=waves,
            reason=row.reason,
            created_by=row.created_by,
            created_at=row.created_at,
            updated_at=row.updated_at,
            completed_at=record.completed_at,
        )

    @staticmethod
    def _event(connection: Connection, row: Row[Any], code: str, detail: str, now: dt.datetime) -> None:
        event_log.record(
            connection,
            [
                Event(
                    at=now,
                    kind="deployment",
                    code=code,
                    detail=f"deployment {row.id}: {detail}",
                    tenant_id=row.tenant_id,
                )
            ],
        )


_REPORTED = {
    UpdateState.DOWNLOADING: core.DeviceState.DOWNLOADING,
    UpdateState.TRIAL: core.DeviceState.TRIAL,
    UpdateState.DEFERRED: core.DeviceState.DEFERRED,
    UpdateState.INSTALLED: core.DeviceState.INSTALLED,
    UpdateState.ROLLED_BACK: core.DeviceState.ROLLED_BACK,
    UpdateState.FAILED: core.DeviceState.FAILED,
}
#: when components are in different states, the device is in the first of these it has
_PRECEDENCE = (
    core.DeviceState.FAILED,
    core.DeviceState.ROLLED_BACK,
    core.DeviceState.TRIAL,
    core.DeviceState.DOWNLOADING,
    core.DeviceState.DEFERRED,
)


def _device_state(
    report: VersionReport,
    deployment_id: str,
    wanted: Sequence[Image],
    before: core.DeviceState,
    refusal: CheckRefusal | None = None,
) -> dict[str, object]:
    """The device's state for its deployment from its report: ``failed`` with the refusal's code if its
    last check refused what it was given; else the worst state its results for this deployment show
    (older deployments' are ignored); else installed once it runs every assigned image."""
    running = {(item.component_id, item.sha256) for item in report.components}
    results = [result for result in report.results if result.deployment_id == deployment_id]
    values: dict[str, object] = {}
    if results:  # a later report without them (the director has them) leaves the counts as they were
        values.update(
            bytes_downloaded=sum(result.bytes_downloaded for result in results),
            bytes_saved=sum(result.bytes_saved for result in results),
        )
    if refusal is not None:
        message = (REFUSED + (refusal.message or refusal.code))[:MAX_MESSAGE_CHARS]
        values.update(state=core.DeviceState.FAILED.value, code=refusal.code, message=message)
        return values
    # what the device says of this deployment's images comes first: a device in its trial already runs
    # the new image, but it is not installed until the trial ends well
    states = {_REPORTED[result.state]: result for result in results}
    for state in _PRECEDENCE:
        if state in states:
            result = states[state]
            values.update(state=state.value, code=result.code, message=result.message)
            return values
    if wanted and all((image.component_id, image.sha256) in running for image in wanted):
        values.update(state=core.DeviceState.INSTALLED.value, code=None, message="")
        return values
    if states and all(_REPORTED[result.state] is core.DeviceState.INSTALLED for result in results):
        values.update(state=core.DeviceState.INSTALLED.value, code=None, message="")
        return values
    if not results:
        return values
    values.update(state=before.value)
    return values


async def run_ticks(
    service: DeploymentService, nudger: Nudger, every_seconds: float, judge_seconds: float | None = None
) -> None:
    """The API's background task, forever: tick every ``every_seconds``; in between, every
    ``judge_seconds``, judge the rollouts reported on since they were last judged; then send the nudges
    of the waves opened."""
    loop = asyncio.get_running_loop()
    step = min(every_seconds, judge_seconds or every_seconds)
    next_tick = loop.time()
    while True:
        try:
            if loop.time() >= next_tick:
                next_tick = loop.time() + every_seconds
                await asyncio.to_thread(service.tick)
            else:
                await asyncio.to_thread(service.judge_reported)
            await service.check_now(nudger)
        except FleetwardError as error:
            logger.warning("could not judge the rollouts: %s", error)
        await asyncio.sleep(step)
