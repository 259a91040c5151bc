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


class EventBudget:
    """How many events one source may record per minute; the rest are counted, not written.

    A refusal is recorded so that an operator sees it, but a device (or a stranger) that repeats a
    refused request must not fill the event log. Sources are keyed (a device id, say); at most
    ``max_keys`` are remembered, and forgetting them only ever lets more through.
    """

    def __init__(self, per_minute: int, *, max_keys: int = 100_000) -> None:
        self._per_minute = per_minute
        self._max_keys = max_keys
        self._counts: dict[str, tuple[int, int]] = {}
        self.suppressed = 0

    def allow(self, key: str, now: dt.datetime) -> bool:
        minute = int(now.timestamp() // 60)
        seen_minute, count = self._counts.get(key, (minute, 0))
        count = count + 1 if seen_minute == minute else 1
        if len(self._counts) >= self._max_keys and key not in self._counts:
            self._counts.clear()
        self._counts[key] = (minute, count)
        if count > self._per_minute:
            self.suppressed += 1
            return False
        return True
