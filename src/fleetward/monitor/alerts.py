"""Alerts: what the detectors found, kept with its evidence until an operator (or a release) closes it.

A finding on a device whose alert of the same code is still open counts as a repeat of that alert (its
count, last time seen, and its severity and score if they rose) rather than a new row: an attack that goes
on is one alert that grows, not thousands. Every alert opened, raised and closed is an event, so it is in
the audit log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetward.errors import Conflict, NotFound
from fleetward.monitor.detect import Finding
from fleetward.store import events as event_log
from fleetward.store.events import Event, Severity
from fleetward.store.schema import alerts

_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}
_EVENT_SEVERITY = {
    "low": Severity.INFO,
    "medium": Severity.WARNING,
    "high": Severity.CRITICAL,
    "critical": Severity.CRITICAL,
}
MAX_EVIDENCE_BYTES = 8 * 1024
#: the columns an alert is inserted with (its id comes from the store)
_COLUMNS = (
    "tenant_id",
    "device_id",
    "group_id",
    "detector",
    "code",
    "severity",
    "score",
    "summary",
    "state",
    "count",
    "opened_at",
    "last_seen_at",
)


@dataclass(frozen=True)
class Alert:
    id: int
    tenant_id: str
    device_id: str
    group_id: str | None
    detector: str
    code: str
    severity: str
    score: float
    summary: str
    evidence: list[dict[str, object]]
    state: str
    count: int
    opened_at: dt.datetime
    last_seen_at: dt.datetime
    closed_at: dt.datetime | None
    closed_by: str | None


@dataclass(frozen=True)
class Raised:
    """What a finding did: opened a new alert, or raised (made worse) or repeated an open one."""

    alert: Alert
    opened: bool
    worse: bool


def _evidence_json(finding: Finding) -> str:
    items = [
        {
            "metric": item.metric,
            "observed": item.observed,
            "expected": item.expected,
            "window_seconds": item.window_seconds,
            "detail": item.detail[:200],
        }
        for item in finding.evidence[:16]
    ]
    text = json.dumps(items, separators=(",", ":"))
    while len(text) > MAX_EVIDENCE_BYTES and items:
        items.pop()
        text = json.dumps(items, separators=(",", ":"))
    return text


def _alert(row: sa.Row[object]) -> Alert:
    mapping = row._mapping
    return Alert(
        id=int(mapping["id"]),
        tenant_id=mapping["tenant_id"],
        device_id=mapping["device_id"],
        group_id=mapping["group_id"],
        detector=mapping["detector"],
        code=mapping["code"],
        severity=mapping["severity"],
        score=float(mapping["score"]),
        summary=mapping["summary"],
        evidence=json.loads(mapping["evidence"]),
        state=mapping["state"],
        count=int(mapping["count"]),
        opened_at=mapping["opened_at"],
        last_seen_at=mapping["last_seen_at"],
        closed_at=mapping["closed_at"],
        closed_by=mapping["closed_by"],
    )


def raise_findings(
    connection: Connection, findings: Sequence[Finding], group_of: dict[tuple[str, str], str | None]
) -> list[Raised]:
    """Record ``findings`` in the caller's transaction: open alerts, or count repeats of open ones."""
    if not findings:
        return []
    keys = sorted({(finding.tenant_id, finding.device_id) for finding in findings})
    open_rows: dict[tuple[str, str, str], Alert] = {}
    for tenant_id in sorted({tenant for tenant, _ in keys}):
        device_ids = [device for tenant, device in keys if tenant == tenant_id]
        for chunk_start in range(0, len(device_ids), 500):
            rows = connection.execute(
                sa.select(alerts).where(
                    alerts.c.tenant_id == tenant_id,
                    alerts.c.device_id.in_(device_ids[chunk_start : chunk_start + 500]),
                    alerts.c.state != "closed",
                )
            )
            for row in rows:
                alert = _alert(row)
                open_rows[(alert.tenant_id, alert.device_id, alert.code)] = alert
    raised: list[Raised] = []
    recorded: list[Event] = []
    for finding in findings:
        at = dt.datetime.fromtimestamp(finding.at, dt.UTC)
        key = (finding.tenant_id, finding.device_id, finding.code)
        current = open_rows.get(key)
        severity = finding.severity.value
        if current is None:
            created = Alert(
                id=0,
                tenant_id=finding.tenant_id,
                device_id=finding.device_id,
                group_id=group_of.get((finding.tenant_id, finding.device_id)),
                detector=finding.detector[:128],
                code=finding.code[:64],
                severity=severity,
                score=finding.score,
                summary=finding.summary[:1000],
                evidence=json.loads(_evidence_json(finding)),
                state="open",
                count=1,
                opened_at=at,
                last_seen_at=at,
                closed_at=None,
                closed_by=None,
            )
            values = {name: getattr(created, name) for name in _COLUMNS}
            values["evidence"] = json.dumps(created.evidence, separators=(",", ":"))
            alert_id = connection.execute(
                alerts.insert().values(**values).returning(alerts.c.id)
            ).scalar_one()
            created = dataclasses.replace(created, id=int(alert_id))
            open_rows[key] = created
            raised.append(Raised(created, opened=True, worse=True))
            recorded.append(_alert_event(created, "alert_opened"))
            continue
        worse = _SEVERITY_RANK[severity] > _SEVERITY_RANK.get(current.severity, 0)
        updated = dataclasses.replace(current, count=current.count + 1, last_seen_at=at)
        if worse or finding.score > current.score:
            updated = dataclasses.replace(updated, score=max(finding.score, current.score))
        if worse:
            updated = dataclasses.replace(
                updated,
                severity=severity,
                summary=finding.summary[:1000],
                evidence=json.loads(_evidence_json(finding)),
            )
        connection.execute(
            alerts.update()
            .where(alerts.c.id == current.id)
            .values(
                count=updated.count,
                last_seen_at=at,
                score=updated.score,
                severity=updated.severity,
                summary=updated.summary,
                evidence=json.dumps(updated.evidence, separators=(",", ":")),
            )
        )
        open_rows[key] = updated
        raised.append(Raised(updated, opened=False, worse=worse))
        if worse:
            recorded.append(_alert_event(updated, "alert_raised"))
    event_log.record(connection, recorded)
    return raised


def _alert_event(alert: Alert, code: str) -> Event:
    return Event(
        at=alert.last_seen_at,
        kind="alert",
        code=code,
        detail=f"alert {alert.id} {alert.code} ({alert.severity}, score {alert.score:.2f}): {alert.summary}",
        severity=_EVENT_SEVERITY.get(alert.severity, Severity.WARNING),
        tenant_id=alert.tenant_id,
        device_id=alert.device_id,
        actor=alert.detector,
    )


def open_of(connection: Connection, tenant_id: str, device_id: str) -> list[Alert]:
    rows = connection.execute(
        sa.select(alerts)
        .where(alerts.c.tenant_id == tenant_id, alerts.c.device_id == device_id, alerts.c.state != "closed")
        .order_by(alerts.c.id)
    )
    return [_alert(row) for row in rows]


def raised_since(
    connection: Connection, tenant_id: str, device_id: str, since: dt.datetime, incident: int | None = None
) -> list[str]:
    """Severities of the alerts seen on the device after ``since`` (opened or repeated), but for the
    ``incident`` alert and others of its code: what the device reported of it while it was being set
    aside (in flight when its session ended, or in its next baseline) is the same incident, not a new
    one."""
    statement = sa.select(alerts.c.severity).where(
        alerts.c.tenant_id == tenant_id, alerts.c.device_id == device_id, alerts.c.last_seen_at > since
    )
    if incident is not None:
        code = sa.select(alerts.c.code).where(alerts.c.id == incident).scalar_subquery()
        statement = statement.where(alerts.c.id != incident, alerts.c.code != code)
    rows = connection.execute(statement)
    return [row.severity for row in rows]


def get(connection: Connection, tenant_id: str, alert_id: int) -> Alert:
    row = connection.execute(
        sa.select(alerts).where(alerts.c.tenant_id == tenant_id, alerts.c.id == alert_id)
    ).first()
    if row is None:
        raise NotFound(f"no alert {alert_id} in this tenant", code="alert_not_found")
    return _alert(row)


def query(
    connection: Connection,
    tenant_id: str,
    *,
    device_id: str | None = None,
    state: str | None = None,
    min_severity: str | None = None,
    limit: int = 100,
) -> list[Alert]:
    statement = (
        sa.select(alerts).where(alerts.c.tenant_id == tenant_id).order_by(alerts.c.id.desc()).limit(limit)
    )
    if device_id is not None:
        statement = statement.where(alerts.c.device_id == device_id)
    if state == "active":
        statement = statement.where(alerts.c.state != "closed")
    elif state is not None:
        statement = statement.where(alerts.c.state == state)
    if min_severity is not None:
        wanted = [name for name, rank in _SEVERITY_RANK.items() if rank >= _SEVERITY_RANK[min_severity]]
        statement = statement.where(alerts.c.severity.in_(wanted))
    return [_alert(row) for row in connection.execute(statement)]


def set_state(
    connection: Connection, tenant_id: str, alert_id: int, state: str, actor: str, now: dt.datetime
) -> Alert:
    """Acknowledge or close an alert; closing is final (a new finding opens a new alert)."""
    current = get(connection, tenant_id, alert_id)
    if current.state == "closed":
        raise Conflict(f"alert {alert_id} is closed", code="alert_closed")
    values: dict[str, object] = {"state": state}
    if state == "closed":
        values.update(closed_at=now, closed_by=actor)
    connection.execute(alerts.update().where(alerts.c.id == alert_id).values(**values))
    changed = get(connection, tenant_id, alert_id)
    event_log.record(
        connection,
        [
            Event(
                at=now,
                kind="alert",
                code=f"alert_{state}",
                detail=f"alert {alert_id} {current.code} {state}",
                tenant_id=tenant_id,
                device_id=current.device_id,
                actor=actor,
            )
        ],
    )
    return changed


def close_of_device(
    connection: Connection, tenant_id: str, device_id: str, actor: str, now: dt.datetime
) -> int:
    """Close every open alert of a device (its release: what they were about has been dealt with)."""
    result = connection.execute(
        alerts.update()
        .where(alerts.c.tenant_id == tenant_id, alerts.c.device_id == device_id, alerts.c.state != "closed")
        .values(state="closed", closed_at=now, closed_by=actor)
    )
    return int(result.rowcount)
