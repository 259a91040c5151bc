"""Events: what happened to whom, and every refusal, recorded next to the data it concerns."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetward.store.schema import events


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``tenant_id`` is ``None`` for what concerns no known tenant."""

    at: dt.datetime
    kind: str
    code: str
    detail: str
    severity: Severity = Severity.INFO
    tenant_id: str | None = None
    device_id: str | None = None
    actor: str | None = None
    id: int | None = None


def record(connection: Connection, items: Sequence[Event]) -> None:
    """Insert ``items`` in the caller's transaction."""
    if not items:
        return
    connection.execute(
        events.insert(),
        [
            {
                "tenant_id": item.tenant_id,
                "device_id": item.device_id,
                "at": item.at,
                "kind": item.kind,
                "code": item.code,
                "severity": item.severity.value,
                "actor": item.actor,
                "detail": item.detail[:2000],
            }
            for item in items
        ],
    )


def query(
    connection: Connection,
    *,
    tenant_id: str | None,
    device_id: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
) -> list[Event]:
    """Newest first, always scoped to one tenant (``None``: events of no known tenant)."""
    statement = sa.select(events).order_by(events.c.id.desc()).limit(limit)
    if tenant_id is None:
        statement = statement.where(events.c.tenant_id.is_(None))
    else:
        statement = statement.where(events.c.tenant_id == tenant_id)
    if device_id is not None:
        statement = statement.where(events.c.device_id == device_id)
    if kind is not None:
        statement = statement.where(events.c.kind == kind)
    if since is not None:
        statement = statement.where(events.c.at >= since)
    return [
        Event(
            id=row.id,
            at=row.at,
            kind=row.kind,
            code=row.code,
            detail=row.detail,
            severity=Severity(row.severity),
            tenant_id=row.tenant_id,
            device_id=row.device_id,
            actor=row.actor,
        )
        for row in connection.execute(statement)
    ]
