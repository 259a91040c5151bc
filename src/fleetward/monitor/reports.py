"""What devices report about themselves: crashes and other application failures, and security baselines.

A device sends a report as telemetry with the property ``fleetward-report`` naming its kind
(``wire.baseline.REPORT_PROPERTY``); the hub hands it here instead of to the telemetry store.
:func:`parse_report` is the pure part: it validates the body against the wire format of its kind and
derives what reports are grouped by (a signature, and a one-line headline). :class:`ReportStore` keeps
them, lists them, and aggregates the failures by signature for operators (as JSON rows or CSV).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.engine import Connection

from fleetward.clock import Clock
from fleetward.errors import InvalidInput, NotFound, PayloadTooLarge
from fleetward.store.database import Database
from fleetward.store.schema import device_reports, devices
from fleetward.wire.baseline import BASELINE_REPORT, MAX_BASELINE_BYTES, SecurityBaseline
from fleetward.wire.reports import (
    AgentReport,
    CapabilityDeniedReport,
    CrashLoopReport,
    CrashReport,
    LaunchRefusedReport,
    StorageQuotaReport,
    last_line,
    normalise_line,
)

#: the kinds a device may name in ``fleetward-report``: the failures of wire.reports, and the baseline
ReportKind = Literal[
    "crash",
    "crash_loop",
    "launch_refused",
    "storage_quota_exceeded",
    "capability_denied",
    "security-baseline",
]
REPORT_KINDS: tuple[str, ...] = get_args(ReportKind)
MAX_FAILURE_REPORT_BYTES = 16 * 1024
MAX_HEADLINE_CHARS = 200
#: how far ahead of the server's clock a device's baseline may be dated
_BASELINE_CLOCK_SKEW = dt.timedelta(minutes=5)

_agent_report: TypeAdapter[AgentReport] = TypeAdapter(AgentReport)
_SIGNATURE_DOMAIN = b"fleetward-report-signature-v1\x00"


@dataclass(frozen=True)
class ParsedReport:
    kind: str
    component_id: str | None
    #: what alike reports share (failures only)
    signature: str | None
    headline: str
    occurred_at: dt.datetime
    body: str  # the validated report, as canonical JSON
    #: the report itself when it is a security baseline (the monitor judges it)
    baseline: SecurityBaseline | None = field(default=None, compare=False)
    #: the report itself when it is a failure or a violation
    failure: AgentReport | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StoredReport:
    id: int
    device_id: str
    kind: str
    component_id: str | None
    signature: str | None
    headline: str
    occurred_at: dt.datetime
    received_at: dt.datetime
    body: str


@dataclass(frozen=True)
class FailureSignature:
    """Alike failures of a tenant's devices, counted: one problem seen many times."""

    signature: str
    kind: str
    component_id: str | None
    headline: str
    count: int
    devices: int
    first_seen: dt.datetime
    last_seen: dt.datetime


def _signature(*parts: str) -> str:
    digest = hashlib.sha256(_SIGNATURE_DOMAIN)
    for part in parts:
        encoded = part.encode("utf-8", "replace")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.hexdigest()


def parse_report(kind: str, body: bytes) -> ParsedReport:
    """A device's report of ``kind``, validated; refused with a code that says what was wrong."""
    if kind not in REPORT_KINDS:
        raise InvalidInput(
            f"unknown report kind {kind[:40]!r}; one of {', '.join(REPORT_KINDS)}", code="report_kind_unknown"
        )
    bound = MAX_BASELINE_BYTES if kind == BASELINE_REPORT else MAX_FAILURE_REPORT_BYTES
    if len(body) > bound:
        raise PayloadTooLarge(f"a {kind} report holds at most {bound} bytes", code="report_too_large")
    try:
        if kind == BASELINE_REPORT:
            baseline = SecurityBaseline.model_validate_json(body)
            return ParsedReport(
                kind,
                None,
                None,
                f"{len(baseline.listening)} listening, {len(baseline.established)} connections, "
                f"{len(baseline.blocked)} blocked",
                baseline.collected_at,
                baseline.model_dump_json(),
                baseline,
            )
        report = _agent_report.validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise InvalidInput(
            f"a {kind} report is malformed at {where}: {first['msg']}", code="report_malformed"
        ) from None
    if report.kind != kind:
        raise InvalidInput(
            f"the report says it is {report.kind!r} but was sent as {kind!r}", code="report_malformed"
        )
    return ParsedReport(
        kind,
        report.component_id,
        _failure_signature(report),
        _headline(report)[:MAX_HEADLINE_CHARS],
        report.occurred_at,
        report.model_dump_json(),
        failure=report,
    )


def _failure_signature(report: AgentReport) -> str:
    if isinstance(report, CrashReport):
        return report.signature()
    if isinstance(report, LaunchRefusedReport):
        return _signature(report.kind, report.component_id, report.reason)
    if isinstance(report, CapabilityDeniedReport):
        return _signature(report.kind, report.component_id, report.capability, normalise_line(report.detail))
    return _signature(report.kind, report.component_id)


def _headline(report: AgentReport) -> str:
    match report:
        case CrashReport():
            line = normalise_line(last_line(report.error_tail))
            return f"{report.exit_status}: {line}" if line else report.exit_status
        case CrashLoopReport():
            return f"{report.crashes} crashes in {report.window_seconds:g} s: no longer restarted"
        case LaunchRefusedReport():
            return f"launch refused ({report.reason})"
        case CapabilityDeniedReport():
            return f"{report.capability} not declared" + (f": {report.detail}" if report.detail else "")
        case StorageQuotaReport():
            return f"storage over quota ({report.used_bytes} of {report.quota_bytes} bytes)"


class ReportStore:
    """Reports kept per tenant and device; every query is scoped by tenant."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self._db = database
        self._clock = clock

    def record(self, tenant_id: str, device_id: str, report: ParsedReport) -> StoredReport:
        received_at = self._clock.now()
        values = {
            "tenant_id": tenant_id,
            "device_id": device_id,
            "kind": report.kind,
            "component_id": report.component_id,
            "signature": report.signature,
            "headline": report.headline,
            "occurred_at": report.occurred_at,
            "received_at": received_at,
            "body": report.body,
        }
        with self._db.write() as connection:
            if report.baseline is not None:
                self._refuse_replay(connection, tenant_id, device_id, report, received_at)
            report_id = connection.execute(
                sa.insert(device_reports).values(**values).returning(device_reports.c.id)
            ).scalar_one()
        return StoredReport(
            report_id,
            device_id,
            report.kind,
            report.component_id,
            report.signature,
            report.headline,
            report.occurred_at,
            received_at,
            report.body,
        )

    def _refuse_replay(
        self, connection: Connection, tenant_id: str, device_id: str, report: ParsedReport, now: dt.datetime
    ) -> None:
        """A baseline describes an interval ending at ``collected_at``: one not newer than the device's last
        (a replay, or a copy sent again) or from the future says nothing true about the device now."""
        if report.occurred_at > now + _BASELINE_CLOCK_SKEW:
            raise InvalidInput(
                f"the security baseline is dated {report.occurred_at.isoformat()}, in the future",
                code="report_from_future",
            )
        newest = connection.execute(
            sa.select(sa.func.max(device_reports.c.occurred_at)).where(
                device_reports.c.tenant_id == tenant_id,
                device_reports.c.device_id == device_id,
                device_reports.c.kind == BASELINE_REPORT,
            )
        ).scalar_one()
        if newest is not None and report.occurred_at <= newest:
            raise InvalidInput(
                f"the security baseline of {report.occurred_at.isoformat()} is not newer than the last one "
                f"({newest.isoformat()}): a replay",
                code="report_replayed",
            )

    def _scoped(
        self,
        statement: sa.Select[Any],
        tenant_id: str,
        *,
        device_id: str | None,
        group_id: str | None,
        since: dt.datetime | None,
        until: dt.datetime | None,
    ) -> sa.Select[Any]:
        statement = statement.where(device_reports.c.tenant_id == tenant_id)
        if device_id is not None:
            statement = statement.where(device_reports.c.device_id == device_id)
        if group_id is not None:
            members = sa.select(devices.c.id).where(
                devices.c.tenant_id == tenant_id, devices.c.group_id == group_id
            )
            statement = statement.where(device_reports.c.device_id.in_(members))
        if since is not None:
            statement = statement.where(device_reports.c.received_at >= since)
        if until is not None:
            statement = statement.where(device_reports.c.received_at < until)
        return statement

    def reports(
        self,
        tenant_id: str,
        *,
        kind: str | None = None,
        device_id: str | None = None,
        group_id: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[StoredReport]:
        """Reports of the tenant, oldest first; page with ``after_id``."""
        statement = self._scoped(
            sa.select(device_reports),
            tenant_id,
            device_id=device_id,
            group_id=group_id,
            since=since,
            until=until,
        )
        if kind is not None:
            statement = statement.where(device_reports.c.kind == kind)
        if after_id is not None:
            statement = statement.where(device_reports.c.id > after_id)
        with self._db.read() as connection:
            rows = connection.execute(statement.order_by(device_reports.c.id).limit(limit)).all()
        return [_stored(row) for row in rows]

    def latest_baseline(self, tenant_id: str, device_id: str) -> StoredReport:
        statement = (
            sa.select(device_reports)
            .where(
                device_reports.c.tenant_id == tenant_id,
                device_reports.c.device_id == device_id,
                device_reports.c.kind == BASELINE_REPORT,
            )
            .order_by(device_reports.c.id.desc())
            .limit(1)
        )
        with self._db.read() as connection:
            row = connection.execute(statement).first()
        if row is None:
            raise NotFound("no security baseline from this device in this tenant", code="baseline_not_found")
        return _stored(row)

    def failures(
        self,
        tenant_id: str,
        *,
        device_id: str | None = None,
        group_id: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 1000,
    ) -> list[FailureSignature]:
        """Failures grouped by signature, the most frequent first."""
        columns = device_reports.c
        statement = self._scoped(
            sa.select(
                columns.signature,
                columns.kind,
                columns.component_id,
                sa.func.max(columns.headline).label("headline"),
                sa.func.count().label("reports"),
                sa.func.count(sa.distinct(columns.device_id)).label("devices"),
                sa.func.min(columns.occurred_at).label("first_seen"),
                sa.func.max(columns.occurred_at).label("last_seen"),
            ).where(columns.signature.is_not(None)),
            tenant_id,
            device_id=device_id,
            group_id=group_id,
            since=since,
            until=until,
        )
        statement = statement.group_by(columns.signature, columns.kind, columns.component_id).order_by(
            sa.desc("reports"), columns.signature
        )
        with self._db.read() as connection:
            rows = connection.execute(statement.limit(limit)).all()
        return [
            FailureSignature(
                row.signature,
                row.kind,
                row.component_id,
                row.headline,
                row.reports,
                row.devices,
                row.first_seen,
                row.last_seen,
            )
            for row in rows
        ]


def _stored(row: sa.Row[Any]) -> StoredReport:
    return StoredReport(
        row.id,
        row.device_id,
        row.kind,
        row.component_id,
        row.signature,
        row.headline,
        row.occurred_at,
        row.received_at,
        row.body,
    )


CSV_COLUMNS = ("signature", "kind", "component_id", "headline", "count", "devices", "first_seen", "last_seen")


def failures_csv(rows: Sequence[FailureSignature]) -> str:
    """The aggregated failures as CSV (RFC 4180), with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.signature,
                row.kind,
                row.component_id or "",
                _csv_safe(row.headline),
                row.count,
                row.devices,
                row.first_seen.isoformat(),
                row.last_seen.isoformat(),
            ]
        )
    return out.getvalue()


def _csv_safe(text: str) -> str:
    """A device wrote this text: keep a spreadsheet from reading it as a formula (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
