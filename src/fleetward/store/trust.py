"""Trust changes: an append-only feed of revocations and quarantines, and a bell rung when one is written.

Every process that holds device sessions (the hub) follows the feed by its sequence number, so that a
revocation written by any process or node ends the session wherever it lives. The bell lets the process
that wrote the change act at once instead of at its next look.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetward.store.schema import trust_changes


class TrustKind(StrEnum):
    DEVICE_REVOKED = "device_revoked"
    CERTIFICATE_REVOKED = "certificate_revoked"
    QUARANTINED = "quarantined"
    RELEASED = "released"


@dataclass(frozen=True)
class TrustChange:
    tenant_id: str
    device_id: str
    kind: TrustKind
    at: dt.datetime
    serial: str | None = None
    seq: int = 0


def record(connection: Connection, changes: Sequence[TrustChange]) -> None:
    """Append ``changes`` in the caller's transaction."""
    if changes:
        connection.execute(
            trust_changes.insert(),
            [
                {
                    "tenant_id": change.tenant_id,
                    "device_id": change.device_id,
                    "serial": change.serial,
                    "kind": change.kind.value,
                    "at": change.at,
                }
                for change in changes
            ],
        )


def since(connection: Connection, seq: int, limit: int = 10_000) -> list[TrustChange]:
    """Changes after ``seq``, oldest first."""
    rows = connection.execute(
        sa.select(trust_changes).where(trust_changes.c.seq > seq).order_by(trust_changes.c.seq).limit(limit)
    )
    return [
        TrustChange(row.tenant_id, row.device_id, TrustKind(row.kind), row.at, row.serial, row.seq)
        for row in rows
    ]


def latest(connection: Connection) -> int:
    value = connection.execute(sa.select(sa.func.max(trust_changes.c.seq))).scalar_one()
    return int(value or 0)


class TrustBell:
    """Listeners called (from any thread) after a trust change is committed."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` on every ring until the returned function is called."""
        with self._lock:
            self._listeners.append(listener)

        def stop_listening() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop_listening

    def ring(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
