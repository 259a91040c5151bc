"""The shell of audits: reads a tenant's snapshot from the store, asks the hubs about revoked certificates,
runs the pure checks (:mod:`fleetward.monitor.audits`), keeps the run and its findings, and runs the tenants'
scheduled audits when they are due.

Whether a revoked certificate still holds a session is asked of the hub holding the device, over the bus
(:class:`SessionProbe`; :class:`BusSessionProbe` is the real one, :class:`FakeSessionProbe` the one tests
use).
A scheduled audit is claimed by moving its ``next_run_at`` with a compare-and-set, so that of several server
processes calling :meth:`AuditService.run_due` only one runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from fleetward.bus.base import Bus
from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import FleetwardError, InvalidInput, NotFound, TransportError
from fleetward.hub.routing import DeviceRouter
from fleetward.monitor.audits import (
    CHECKS,
    AuditPolicy,
    AuditSeverity,
    AuditSnapshot,
    Authority,
    Check,
    DeviceCertificate,
    DeviceKey,
    Finding,
    OperatorRole,
    PublishedApp,
    Refusal,
    RunningComponent,
    TakeOver,
    TufRoot,
    parse_takeover,
    run_checks,
    select_checks,
)
from fleetward.registry.access import Principal
from fleetward.registry.models import DeviceStatus, Scope
from fleetward.store import events as event_log
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import (
    audit_findings,
    audit_runs,
    audit_schedules,
    certificate_authorities,
    certificates,
    device_reports,
    device_updates,
    devices,
    events,
    images,
    operators,
    role_assignments,
    security_floors,
    tuf_metadata,
)
from fleetward.wire.baseline import BASELINE_REPORT, SecurityBaseline

logger = logging.getLogger(__name__)

TAKEOVER_CODE = "session_taken_over"
CLIENT_ID_CODE = "client_id_mismatch"


# ---------------------------------------------------------------------------------------------- the probe


class SessionProbe(Protocol):
    """Asks the hubs whether a device is connected, and with which certificate."""

    async def connected_serial(self, tenant_id: str, device_id: str) -> str | None:
        """The serial (hex) of the certificate the device's session presented; ``None``: not connected.
        Raises :class:`TransportError` when no answer came."""
        ...


class BusSessionProbe:
    """The real probe: the ``state`` request on the device's subject (nobody holding it: not connected)."""

    def __init__(self, bus: Bus, limits: Limits) -> None:
        self._router = DeviceRouter(bus, limits)

    async def connected_serial(self, tenant_id: str, device_id: str) -> str | None:
        return await self._router.connected_serial(tenant_id, device_id)


class FakeSessionProbe:
    """Devices connected with the given serials; ``silent`` devices get no answer. Remembers who was asked."""

    def __init__(
        self, sessions: Mapping[tuple[str, str], str] | None = None, *, silent: frozenset[str] = frozenset()
    ) -> None:
        self.sessions = dict(sessions or {})
        self.silent = silent
        self.asked: list[tuple[str, str]] = []

    async def connected_serial(self, tenant_id: str, device_id: str) -> str | None:
        self.asked.append((tenant_id, device_id))
        if device_id in self.silent:
            raise TransportError("no hub answered in time", code="request_timeout")
        return self.sessions.get((tenant_id, device_id))


# ---------------------------------------------------------------------------------------------- records


class AuditTrigger(StrEnum):
    SCHEDULE = "schedule"
    ON_DEMAND = "on_demand"


class RunState(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class SeverityCounts:
    critical: int = 0
    high: int = 0
    medium: int = 0
    low: int = 0


@dataclass(frozen=True)
class AuditRun:
    id: str
    tenant_id: str
    trigger: AuditTrigger
    checks: tuple[str, ...]
    state: RunState
    #: findings kept
    findings: int
    counts: SeverityCounts
    started_by: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class StoredFinding:
    id: int
    run_id: str
    check: str
    severity: str
    subject_kind: str
    subject_id: str
    detail: str
    found_at: dt.datetime


@dataclass(frozen=True)
class AuditRunDetail:
    run: AuditRun
    findings: tuple[StoredFinding, ...]
    #: pass as ``after_id`` for the next page; ``None``: this was the last
    next_after_id: int | None


@dataclass(frozen=True)
class AuditSchedule:
    tenant_id: str
    interval_seconds: int
    #: the checks it runs; empty: all of them (those added later too)
    checks: tuple[str, ...]
    next_run_at: dt.datetime
    updated_at: dt.datetime


# ---------------------------------------------------------------------------------------------- the service


class AuditService:
    """Audits of tenants, on demand and on schedule; every query is scoped by tenant."""

    def __init__(
        self,
        database: Database,
        clock: Clock,
        limits: Limits,
        probe: SessionProbe,
        *,
        policy: AuditPolicy | None = None,
    ) -> None:
        self._db = database
        self._clock = clock
        self._limits = limits
        self._probe = probe
        self.policy = policy or AuditPolicy()

    # ------------------------------------------------------------------ running

    async def run(
        self,
        principal: Principal,
        tenant_id: str,
        checks: Sequence[str] | None = None,
        trigger: AuditTrigger = AuditTrigger.ON_DEMAND,
    ) -> AuditRun:
        """Run ``checks`` (``None``: all) over the tenant now; the finished run, its findings kept."""
        principal.require(tenant_id, Scope.WRITE)
        return await self._run(tenant_id, select_checks(checks), AuditTrigger(trigger), principal.email)

    async def run_due(self, now: dt.datetime) -> list[str]:
        """Run the scheduled audits due at ``now`` that this process claims; the ids of the runs."""
        claimed = await asyncio.to_thread(self._claim_due, now)
        started: list[str] = []
        for tenant_id, names in claimed:
            try:
                run = await self._run(tenant_id, select_checks(names), AuditTrigger.SCHEDULE, None)
            except FleetwardError as error:
                logger.warning(
                    "the scheduled audit of tenant %s failed: %s (%s)", tenant_id, error, error.code
                )
                continue
            started.append(run.id)
        return started

    async def _run(
        self, tenant_id: str, checks: tuple[Check, ...], trigger: AuditTrigger, started_by: str | None
    ) -> AuditRun:
        run_id = str(uuid.uuid4())
        started_at = self._clock.now()
        await asyncio.to_thread(self._start, run_id, tenant_id, checks, trigger, started_by, started_at)
        try:
            snapshot = await asyncio.to_thread(self._snapshot, tenant_id, checks, started_at)
            if Check.REVOKED_CERTIFICATE_CONNECTED in checks:
                snapshot = replace(snapshot, sessions=await self._sessions(snapshot))
            findings = await asyncio.to_thread(run_checks, snapshot, checks, self.policy)
            return await asyncio.to_thread(self._finish, run_id, tenant_id, trigger, started_by, findings)
        except BaseException:
            with contextlib.suppress(FleetwardError):
                await asyncio.to_thread(self._fail, run_id)
            raise

    async def _sessions(self, snapshot: AuditSnapshot) -> dict[str, str | None]:
        """Ask the hubs about each device of a revoked, unexpired certificate (at most ``max_probes``)."""
        wanted = sorted(
            {
                certificate.device_id
                for certificate in snapshot.certificates
                if certificate.revoked_at is not None and certificate.not_after > snapshot.now
            }
        )[: self.policy.max_probes]
        gate = asyncio.Semaphore(self.policy.probe_concurrency)
        answers: dict[str, str | None] = {}

        async def ask(device_id: str) -> None:
            async with gate:
                try:
                    answers[device_id] = await self._probe.connected_serial(snapshot.tenant_id, device_id)
                except FleetwardError as error:  # no answer: the check reports it as unknown
                    logger.info("audit: no answer whether %s is connected (%s)", device_id, error.code)

        await asyncio.gather(*(ask(device_id) for device_id in wanted))
        return answers

    def _start(
        self,
        run_id: str,
        tenant_id: str,
        checks: tuple[Check, ...],
        trigger: AuditTrigger,
        started_by: str | None,
        started_at: dt.datetime,
    ) -> None:
        with self._db.write() as connection:
            connection.execute(
                audit_runs.insert().values(
                    id=run_id,
                    tenant_id=tenant_id,
                    trigger=trigger.value,
                    checks=json.dumps([check.value for check in checks]),
                    state=RunState.RUNNING.value,
                    findings=0,
                    started_by=started_by,
                    started_at=started_at,
                )
            )

    def _finish(
        self,
        run_id: str,
        tenant_id: str,
        trigger: AuditTrigger,
        started_by: str | None,
        findings: Sequence[Finding],
    ) -> AuditRun:
        now = self._clock.now()
        counts = _count(finding.severity for finding in findings)
        with self._db.write() as connection:
            if findings:
                connection.execute(
                    audit_findings.insert(),
                    [
                        {
                            "run_id": run_id,
                            "tenant_id": tenant_id,
                            "check": finding.check.value,
                            "severity": finding.severity.value,
                            "subject_kind": finding.subject_kind.value,
                            "subject_id": finding.subject_id,
                            "detail": finding.detail,
                            "found_at": now,
                        }
                        for finding in findings
                    ],
                )
            connection.execute(
                audit_runs.update()
                .where(audit_runs.c.id == run_id, audit_runs.c.tenant_id == tenant_id)
                .values(state=RunState.FINISHED.value, findings=len(findings), finished_at=now)
            )
            serious = counts.critical + counts.high
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="audit",
                        code="audit_finished",
                        detail=f"audit {run_id} ({trigger.value}): {len(findings)} findings "
                        f"({counts.critical} critical, {counts.high} high, {counts.medium} medium, "
                        f"{counts.low} low)",
                        severity=Severity.WARNING if serious else Severity.INFO,
                        tenant_id=tenant_id,
                        actor=started_by,
                    )
                ],
            )
            row = connection.execute(sa.select(audit_runs).where(audit_runs.c.id == run_id)).one()
        return _run_of(row, counts)

    def _fail(self, run_id: str) -> None:
        with self._db.write() as connection:
            connection.execute(
                audit_runs.update()
                .where(audit_runs.c.id == run_id, audit_runs.c.state == RunState.RUNNING.value)
                .values(state=RunState.FAILED.value, finished_at=self._clock.now())
            )

    # ------------------------------------------------------------------ the snapshot

    def _snapshot(self, tenant_id: str, checks: tuple[Check, ...], now: dt.datetime) -> AuditSnapshot:
        """What ``checks`` judge, read in one transaction; each read is bounded by the policy."""
        wanted = set(checks)
        policy = self.policy
        values: dict[str, Any] = {}
        with self._db.read() as connection:
            if wanted & {Check.CERTIFICATE_SHARED, Check.CONFLICTING_CLIENT_ID}:
                values["takeovers"], values["client_id_refusals"] = self._hub_events(
                    connection, tenant_id, now
                )
            if wanted & {Check.REVOKED_CERTIFICATE_CONNECTED, Check.CERTIFICATE_EXPIRING, Check.WEAK_KEY}:
                values["certificates"] = self._certificates(
                    connection, tenant_id, now, with_der=Check.WEAK_KEY in wanted
                )
            if wanted & {Check.CA_EXPIRING, Check.WEAK_KEY}:
                values["authorities"] = tuple(
                    Authority(row.id, row.kind, row.not_after, row.active, row.certificate)
                    for row in connection.execute(
                        sa.select(certificate_authorities)
                        .where(certificate_authorities.c.tenant_id == tenant_id)
                        .limit(policy.max_rows)
                    )
                )
            if Check.CA_EXPIRING in wanted:
                root = connection.execute(
                    sa.select(tuf_metadata.c.version, tuf_metadata.c.expires_at)
                    .where(tuf_metadata.c.tenant_id == tenant_id, tuf_metadata.c.role == "root")
                    .order_by(tuf_metadata.c.version.desc())
                    .limit(1)
                ).first()
                values["tuf_root"] = TufRoot(root.version, root.expires_at) if root is not None else None
            if Check.WEAK_KEY in wanted:
                values["device_keys"] = tuple(
                    DeviceKey(row.id, row.public_key)
                    for row in connection.execute(
                        sa.select(devices.c.id, devices.c.public_key)
                        .where(devices.c.tenant_id == tenant_id)
                        .limit(policy.max_rows)
                    )
                )
            if wanted & {Check.MANIFEST_BROADER_THAN_USE, Check.VERSION_BELOW_FLOOR}:
                values["running"] = self._running(connection, tenant_id)
            if Check.VERSION_BELOW_FLOOR in wanted:
                values["floors"] = {
                    row.component: row.minimum_version
                    for row in connection.execute(
                        sa.select(security_floors.c.component, security_floors.c.minimum_version).where(
                            security_floors.c.tenant_id == tenant_id
                        )
                    )
                }
            if Check.MANIFEST_BROADER_THAN_USE in wanted:
                values.update(self._use(connection, tenant_id, values["running"], now))
            if Check.OPERATOR_WITHOUT_MFA in wanted:
                values["operators"] = operator_roles(connection, tenant_id, policy.max_rows)
        return AuditSnapshot(tenant_id=tenant_id, now=now, **values)

    def _hub_events(
        self, connection: Connection, tenant_id: str, now: dt.datetime
    ) -> tuple[tuple[TakeOver, ...], tuple[Refusal, ...]]:
        since = now - dt.timedelta(seconds=self.policy.window_seconds)
        rows = connection.execute(
            sa.select(events.c.device_id, events.c.at, events.c.code, events.c.detail)
            .where(
                events.c.tenant_id == tenant_id,
                events.c.kind == "hub",
                events.c.code.in_([TAKEOVER_CODE, CLIENT_ID_CODE]),
                events.c.device_id.is_not(None),
                events.c.at >= since,
            )
            .order_by(events.c.at.desc())
            .limit(self.policy.max_events)
        )
        takeovers: list[TakeOver] = []
        refusals: list[Refusal] = []
        for row in rows:
            if row.code == CLIENT_ID_CODE:
                refusals.append(Refusal(row.device_id, row.at))
                continue
            new, old = parse_takeover(row.detail)
            if old is not None:
                takeovers.append(TakeOver(row.device_id, row.at, old, new))
        return tuple(takeovers), tuple(refusals)

    def _certificates(
        self, connection: Connection, tenant_id: str, now: dt.datetime, *, with_der: bool
    ) -> tuple[DeviceCertificate, ...]:
        columns = [
            certificates.c.serial,
            certificates.c.device_id,
            certificates.c.not_before,
            certificates.c.not_after,
            certificates.c.revoked_at,
            devices.c.status,
        ]
        if with_der:
            columns.append(certificates.c.der)
        rows = connection.execute(
            sa.select(*columns)
            .join(devices, devices.c.id == certificates.c.device_id)
            .where(
                certificates.c.tenant_id == tenant_id,
                devices.c.tenant_id == tenant_id,
                certificates.c.not_after > now,
            )
            .limit(self.policy.max_rows)
        )
        return tuple(
            DeviceCertificate(
                row.serial,
                row.device_id,
                row.not_before,
                row.not_after,
                row.revoked_at,
                row.status == DeviceStatus.ACTIVE.value,
                row.der if with_der else b"",
            )
            for row in rows
        )

    def _running(self, connection: Connection, tenant_id: str) -> tuple[RunningComponent, ...]:
        found: list[RunningComponent] = []
        rows = connection.execute(
            sa.select(device_updates.c.device_id, device_updates.c.components)
            .where(device_updates.c.tenant_id == tenant_id)
            .limit(self.policy.max_rows)
        )
        for row in rows:
            try:
                items = json.loads(row.components)
            except ValueError:
                continue
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and all(
                    isinstance(item.get(key), str) for key in ("component_id", "version", "sha256")
                ):
                    found.append(
                        RunningComponent(row.device_id, item["component_id"], item["version"], item["sha256"])
                    )
        return tuple(found)

    def _use(
        self,
        connection: Connection,
        tenant_id: str,
        running: tuple[RunningComponent, ...],
        now: dt.datetime,
    ) -> dict[str, Any]:
        """The running applications' manifests, and what the baselines of the window say they used."""
        policy = self.policy
        since = now - dt.timedelta(seconds=policy.manifest_window_seconds)
        wanted = sorted({item.sha256 for item in running})
        apps: list[PublishedApp] = []
        for start in range(0, len(wanted), 500):
            apps.extend(
                PublishedApp(row.component_id, row.version, row.sha256, row.manifest)
                for row in connection.execute(
                    sa.select(images.c.component_id, images.c.version, images.c.sha256, images.c.manifest)
                    .where(
                        images.c.tenant_id == tenant_id,
                        images.c.kind == "app",
                        images.c.sha256.in_(wanted[start : start + 500]),
                    )
                    .limit(policy.max_rows)
                )
            )
        reports = device_reports.c
        in_window = sa.and_(
            reports.tenant_id == tenant_id, reports.kind == BASELINE_REPORT, reports.received_at >= since
        )
        reporting = frozenset(
            connection.execute(
                sa.select(reports.device_id).where(in_window).distinct().limit(policy.max_rows)
            ).scalars()
        )
        used: set[tuple[str, str, int]] = set()
        read = 0
        bodies = connection.execute(
            sa.select(reports.body)
            .where(in_window, reports.body.contains('"allowed":[{', autoescape=True))
            .order_by(reports.id.desc())
            .limit(policy.max_baselines)
        ).scalars()
        for body in bodies:
            read += 1
            try:
                baseline = SecurityBaseline.model_validate_json(body)
            except ValidationError:
                continue  # kept only once validated: a row that no longer reads is no evidence
            used.update((item.component_id, item.host, item.port) for item in baseline.allowed)
        return {
            "apps": tuple(apps),
            "used_connections": frozenset(used),
            "baseline_devices": reporting,
            "baselines_truncated": read >= policy.max_baselines,
        }

    # ------------------------------------------------------------------ reading runs

    def list_runs(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        before: dt.datetime | None = None,
        limit: int = 50,
    ) -> list[AuditRun]:
        """The tenant's runs, newest first; page with ``before`` (the last run's ``started_at``)."""
        principal.require(tenant_id, Scope.READ)
        limit = self._bounded(limit)
        statement = sa.select(audit_runs).where(audit_runs.c.tenant_id == tenant_id)
        if before is not None:
            statement = statement.where(audit_runs.c.started_at < before)
        with self._db.read() as connection:
            rows = connection.execute(
                statement.order_by(audit_runs.c.started_at.desc(), audit_runs.c.id).limit(limit)
            ).all()
            counts = self._counts(connection, tenant_id, [row.id for row in rows])
        return [_run_of(row, counts.get(row.id, SeverityCounts())) for row in rows]

    def get_run(
        self,
        principal: Principal,
        tenant_id: str,
        run_id: str,
        *,
        after_id: int | None = None,
        limit: int = 100,
    ) -> AuditRunDetail:
        """One run with a page of its findings (most severe first); page on with ``next_after_id``."""
        principal.require(tenant_id, Scope.READ)
        limit = self._bounded(limit)
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(audit_runs).where(
                    audit_runs.c.tenant_id == tenant_id, audit_runs.c.id == run_id[:64]
                )
            ).first()
            if row is None:
                raise NotFound("no such audit run in this tenant", code="audit_run_not_found")
            statement = sa.select(audit_findings).where(
                audit_findings.c.tenant_id == tenant_id, audit_findings.c.run_id == row.id
            )
            if after_id is not None:
                statement = statement.where(audit_findings.c.id > after_id)
            found = connection.execute(statement.order_by(audit_findings.c.id).limit(limit + 1)).all()
            counts = self._counts(connection, tenant_id, [row.id])
        page = tuple(
            StoredFinding(
                item.id,
                item.run_id,
                item.check,
                item.severity,
                item.subject_kind,
                item.subject_id,
                item.detail,
                item.found_at,
            )
            for item in found[:limit]
        )
        next_after = page[-1].id if len(found) > limit and page else None
        return AuditRunDetail(_run_of(row, counts.get(row.id, SeverityCounts())), page, next_after)

    def _bounded(self, limit: int) -> int:
        if not 1 <= limit <= self._limits.max_list_items:
            raise InvalidInput(f"limit is 1 to {self._limits.max_list_items}", code="limit_out_of_range")
        return limit

    @staticmethod
    def _counts(connection: Connection, tenant_id: str, run_ids: list[str]) -> dict[str, SeverityCounts]:
        if not run_ids:
            return {}
        rows = connection.execute(
            sa.select(audit_findings.c.run_id, audit_findings.c.severity, sa.func.count().label("n"))
            .where(audit_findings.c.tenant_id == tenant_id, audit_findings.c.run_id.in_(run_ids))
            .group_by(audit_findings.c.run_id, audit_findings.c.severity)
        )
        tallies: dict[str, dict[str, int]] = {}
        for row in rows:
            tallies.setdefault(row.run_id, {})[row.severity] = row.n
        return {
            run_id: SeverityCounts(
                **{name: tally.get(name, 0) for name in ("critical", "high", "medium", "low")}
            )
            for run_id, tally in tallies.items()
        }

    # ------------------------------------------------------------------ the schedule

    def set_schedule(
        self,
        principal: Principal,
        tenant_id: str,
        interval_seconds: int,
        checks: Sequence[str] | None = None,
    ) -> AuditSchedule:
        """Audit the tenant every ``interval_seconds`` from now on (the first run one interval from now),
        with ``checks`` (``None`` or none: all of them, those added later too)."""
        principal.require(tenant_id, Scope.WRITE)
        policy = self.policy
        if isinstance(interval_seconds, bool) or not isinstance(interval_seconds, int):
            raise TypeError("interval_seconds is an int")
        if (
            not policy.min_schedule_interval_seconds
            <= interval_seconds
            <= policy.max_schedule_interval_seconds
        ):
            raise InvalidInput(
                f"an audit schedule runs every {policy.min_schedule_interval_seconds} to "
                f"{policy.max_schedule_interval_seconds} seconds",
                code="audit_interval_out_of_range",
            )
        names = [check.value for check in select_checks(checks)] if checks else []
        now = self._clock.now()
        next_run_at = now + dt.timedelta(seconds=interval_seconds)
        values = {
            "interval_seconds": interval_seconds,
            "checks": json.dumps(names),
            "next_run_at": next_run_at,
            "updated_at": now,
        }
        with self._db.write() as connection:
            changed = connection.execute(
                audit_schedules.update().where(audit_schedules.c.tenant_id == tenant_id).values(**values)
            ).rowcount
            if not changed:
                connection.execute(audit_schedules.insert().values(tenant_id=tenant_id, **values))
            event_log.record(
                connection,
                [
                    Event(
                        at=now,
                        kind="audit",
                        code="schedule_set",
                        detail=f"audits every {interval_seconds} s of "
                        + (", ".join(names) if names else "every check"),
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )
        return AuditSchedule(tenant_id, interval_seconds, tuple(names), next_run_at, now)

    def get_schedule(self, principal: Principal, tenant_id: str) -> AuditSchedule:
        principal.require(tenant_id, Scope.READ)
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(audit_schedules).where(audit_schedules.c.tenant_id == tenant_id)
            ).first()
        if row is None:
            raise NotFound("this tenant has no audit schedule", code="audit_schedule_not_found")
        return AuditSchedule(
            row.tenant_id,
            row.interval_seconds,
            tuple(json.loads(row.checks)),
            row.next_run_at,
            row.updated_at,
        )

    def delete_schedule(self, principal: Principal, tenant_id: str) -> None:
        """No more scheduled audits of the tenant (on-demand ones still run)."""
        principal.require(tenant_id, Scope.WRITE)
        with self._db.write() as connection:
            deleted = connection.execute(
                audit_schedules.delete().where(audit_schedules.c.tenant_id == tenant_id)
            ).rowcount
            if not deleted:
                raise NotFound("this tenant has no audit schedule", code="audit_schedule_not_found")
            event_log.record(
                connection,
                [
                    Event(
                        at=self._clock.now(),
                        kind="audit",
                        code="schedule_removed",
                        detail="scheduled audits stopped",
                        tenant_id=tenant_id,
                        actor=principal.email,
                    )
                ],
            )

    def _claim_due(self, now: dt.datetime) -> list[tuple[str, list[str]]]:
        """The schedules due at ``now`` whose ``next_run_at`` this process moved on (compare-and-set: a
        schedule another process claimed first has moved already, and the update matches no row)."""
        claimed: list[tuple[str, list[str]]] = []
        with self._db.write() as connection:
            due = connection.execute(
                sa.select(audit_schedules)
                .where(audit_schedules.c.next_run_at <= now)
                .order_by(audit_schedules.c.next_run_at)
                .limit(self.policy.max_due_per_tick)
            ).all()
            for row in due:
                interval = dt.timedelta(seconds=row.interval_seconds)
                following = row.next_run_at + interval
                if following <= now:  # missed runs are not caught up: one now, the next an interval on
                    following = now + interval
                moved = connection.execute(
                    audit_schedules.update()
                    .where(
                        audit_schedules.c.tenant_id == row.tenant_id,
                        audit_schedules.c.next_run_at == row.next_run_at,
                    )
                    .values(next_run_at=following)
                ).rowcount
                if moved == 1:
                    names = json.loads(row.checks)
                    claimed.append((row.tenant_id, [name for name in names if name in CHECKS]))
        return claimed


async def run_schedules(audits: AuditService, clock: Clock, every_seconds: float = 60.0) -> None:
    """Run the scheduled audits that are due, every ``every_seconds``, until cancelled (what a server runs
    beside the API; each process may: a schedule is claimed by one)."""
    while True:
        try:
            await audits.run_due(clock.now())
        except FleetwardError as error:  # the store is unavailable: the next round tries again
            logger.warning("could not run the scheduled audits: %s (%s)", error, error.code)
        await asyncio.sleep(every_seconds)


def operator_roles(connection: Connection, tenant_id: str, limit: int) -> tuple[OperatorRole, ...]:
    """The operators holding a role in the tenant, and whether each has MFA on."""
    rows = connection.execute(
        sa.select(operators.c.id, operators.c.email, role_assignments.c.role, operators.c.mfa_enabled_at)
        .join(operators, operators.c.id == role_assignments.c.operator_id)
        .where(role_assignments.c.tenant_id == tenant_id)
        .order_by(operators.c.email)
        .limit(limit)
    )
    return tuple(OperatorRole(row.id, row.email, row.role, row.mfa_enabled_at is not None) for row in rows)


def _count(severities: Iterable[AuditSeverity]) -> SeverityCounts:
    tally = dict.fromkeys(AuditSeverity, 0)
    for severity in severities:
        tally[AuditSeverity(severity)] += 1
    return SeverityCounts(
        critical=tally[AuditSeverity.CRITICAL],
        high=tally[AuditSeverity.HIGH],
        medium=tally[AuditSeverity.MEDIUM],
        low=tally[AuditSeverity.LOW],
    )


def _run_of(row: sa.Row[Any], counts: SeverityCounts) -> AuditRun:
    return AuditRun(
        id=row.id,
        tenant_id=row.tenant_id,
        trigger=AuditTrigger(row.trigger),
        checks=tuple(json.loads(row.checks)),
        state=RunState(row.state),
        findings=row.findings,
        counts=counts,
        started_by=row.started_by,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
