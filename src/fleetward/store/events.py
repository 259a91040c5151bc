"""Events: what happened to whom, and every refusal, recorded next to the data it concerns.

The event log is the audit log (ADR 0016): :func:`record` makes each event an entry of its tenant's
hash chain (``store/audit_chain.py``), in the caller's transaction, so an entry commits with the change it
records or not at all. :func:`read_chain` and :func:`verify_chain` read a chain back in pages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from fleetward.store.audit_chain import (
    GENESIS,
    ChainEntry,
    ChainPosition,
    Verification,
    canonical,
    chained_hash,
    verify,
)
from fleetward.store.database import Database
from fleetward.store.schema import audit_heads, devices, events

MAX_DETAIL_CHARS = 2000
_EVENT_COLUMNS = (
    "tenant_id",
    "device_id",
    "at",
    "kind",
    "code",
    "severity",
    "actor",
    "detail",
    "chain",
    "chain_seq",
    "prev_hash",
    "hash",
)
_INSERT_EVENTS = f"INSERT INTO {events.name} ({', '.join(_EVENT_COLUMNS)}) VALUES ({{values}})"  # noqa: S608
#: entries read per query when a chain is exported or verified (memory stays bounded by this)
CHAIN_PAGE = 1000


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


def chain_of(tenant_id: str | None) -> str:
    """The audit chain an event of ``tenant_id`` belongs to: the tenant's own, ``""`` for no tenant."""
    return tenant_id or ""


def record(connection: Connection, items: Sequence[Event]) -> None:
    """Insert ``items`` in the caller's transaction, each as the next entry of its tenant's audit chain.

    Per call: one lock-and-read of each chain's head (in sorted order, so that two transactions never wait
    on each other's heads), one insert of all the rows, one update of the heads.
    """
    if not items:
        return
    sqlite_store = connection.dialect.name == "sqlite"
    chains = sorted({chain_of(item.tenant_id) for item in items})
    heads = _lock_heads(connection, chains)
    rows: list[tuple[object, ...]] = []
    for item in items:
        chain = chain_of(item.tenant_id)
        seq = heads[chain].seq + 1
        detail = item.detail[:MAX_DETAIL_CHARS]
        severity = item.severity.value
        content = canonical(
            chain=chain,
            seq=seq,
            at=item.at,
            kind=item.kind,
            code=item.code,
            severity=severity,
            actor=item.actor,
            tenant_id=item.tenant_id,
            device_id=item.device_id,
            detail=detail,
        )
        prev_hash = heads[chain].hash
        digest = chained_hash(prev_hash, content)
        heads[chain] = ChainPosition(seq, digest)
        at = item.at.astimezone(dt.UTC).replace(tzinfo=None)  # as schema.UtcDateTime stores it
        stored_at = at.isoformat(sep=" ", timespec="microseconds") if sqlite_store else at
        rows.append(
            (
                item.tenant_id,
                item.device_id,
                stored_at,
                item.kind,
                item.code,
                severity,
                item.actor,
                detail,
                chain,
                seq,
                prev_hash,
                digest,
            )
        )
    # Straight to the driver's executemany (as ``Database.insert_rows`` does for telemetry): SQLAlchemy's
    # per-row parameter processing would cost more than the insert. Values are already in stored form.
    marker = "?" if sqlite_store else "%s"
    connection.exec_driver_sql(_INSERT_EVENTS.format(values=", ".join([marker] * len(_EVENT_COLUMNS))), rows)
    connection.execute(
        audit_heads.update()
        .where(audit_heads.c.chain == sa.bindparam("head_chain"))
        .values(seq=sa.bindparam("head_seq"), hash=sa.bindparam("head_hash")),
        [
            {"head_chain": chain, "head_seq": heads[chain].seq, "head_hash": heads[chain].hash}
            for chain in chains
        ],
    )


def _lock_heads(connection: Connection, chains: list[str]) -> dict[str, ChainPosition]:
    """Create the missing heads, then lock and read them all, in ``chains``' (sorted) order.

    ``FOR UPDATE`` holds each head until the caller's transaction ends, so appenders to one chain queue
    (PostgreSQL locks the rows in the order the query sorts them). SQLite renders no ``FOR UPDATE``: its
    write transactions are exclusive already (``BEGIN IMMEDIATE``, see ``store/database.py``).
    """
    insert: Any = sqlite.insert if connection.dialect.name == "sqlite" else postgresql.insert
    connection.execute(
        insert(audit_heads).on_conflict_do_nothing(),
        [{"chain": chain, "seq": GENESIS.seq, "hash": GENESIS.hash} for chain in chains],
    )
    locked = connection.execute(
        sa.select(audit_heads.c.chain, audit_heads.c.seq, audit_heads.c.hash)
        .where(audit_heads.c.chain.in_(chains))
        .order_by(audit_heads.c.chain)
        .with_for_update()
    )
    return {row.chain: ChainPosition(row.seq, row.hash) for row in locked}


def query(
    connection: Connection,
    *,
    tenant_id: str | None,
    device_id: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
    group_id: str | None = None,
    until: dt.datetime | None = None,
    code: str | None = None,
    severity: Severity | None = None,
) -> list[Event]:
    """Newest first, always scoped to one tenant (``None``: events of no known tenant).

    ``since`` is inclusive, ``until`` exclusive. ``group_id`` keeps the events of the devices that are in
    that group of the tenant now.
    """
    statement = sa.select(events).order_by(events.c.id.desc()).limit(limit)
    if tenant_id is None:
        statement = statement.where(events.c.tenant_id.is_(None))
    else:
        statement = statement.where(events.c.tenant_id == tenant_id)
    if device_id is not None:
        statement = statement.where(events.c.device_id == device_id)
    if group_id is not None:
        statement = statement.join(
            devices, sa.and_(devices.c.id == events.c.device_id, devices.c.tenant_id == events.c.tenant_id)
        ).where(devices.c.group_id == group_id)
    if kind is not None:
        statement = statement.where(events.c.kind == kind)
    if code is not None:
        statement = statement.where(events.c.code == code)
    if severity is not None:
        statement = statement.where(events.c.severity == severity.value)
    if since is not None:
        statement = statement.where(events.c.at >= since)
    if until is not None:
        statement = statement.where(events.c.at < until)
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


# ---------------------------------------------------------------------- reading the audit log


def audit_head(connection: Connection, chain: str) -> ChainPosition | None:
    """The newest entry of ``chain`` as its head records it (``None``: nothing was ever appended)."""
    row = connection.execute(
        sa.select(audit_heads.c.seq, audit_heads.c.hash).where(audit_heads.c.chain == chain)
    ).first()
    return None if row is None else ChainPosition(row.seq, row.hash)


def chain_page(
    connection: Connection, chain: str, *, after_seq: int, until_seq: int | None, limit: int
) -> list[ChainEntry]:
    """Up to ``limit`` entries of ``chain`` after ``after_seq`` (up to ``until_seq``), in ``seq`` order."""
    statement = (
        sa.select(events)
        .where(events.c.chain == chain, events.c.chain_seq > after_seq)
        .order_by(events.c.chain_seq)
        .limit(limit)
    )
    if until_seq is not None:
        statement = statement.where(events.c.chain_seq <= until_seq)
    return [_entry(row) for row in connection.execute(statement)]


def _entry(row: Any) -> ChainEntry:
    return ChainEntry(
        chain=row.chain,
        seq=row.chain_seq,
        at=row.at,
        kind=row.kind,
        code=row.code,
        severity=row.severity,
        actor=row.actor,
        tenant_id=row.tenant_id,
        device_id=row.device_id,
        detail=row.detail,
        prev_hash=row.prev_hash,
        hash=row.hash,
        event_id=row.id,
    )


def read_chain(
    database: Database,
    chain: str,
    *,
    after_seq: int = 0,
    until_seq: int | None = None,
    limit: int | None = None,
    page: int = CHAIN_PAGE,
) -> Iterator[ChainEntry]:
    """The entries of ``chain`` after ``after_seq`` in ``seq`` order, read ``page`` at a time (one short read
    transaction each), at most ``limit`` of them."""
    remaining = limit
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        with database.read() as connection:
            found = chain_page(connection, chain, after_seq=after_seq, until_seq=until_seq, limit=size)
        yield from found
        if len(found) < size:
            return
        after_seq = found[-1].seq
        if remaining is not None:
            remaining -= len(found)


def verify_chain(
    database: Database, chain: str, *, anchor: ChainPosition | None = None, page: int = CHAIN_PAGE
) -> tuple[Verification, ChainPosition | None]:
    """Verify ``chain`` as stored, against its head (and ``anchor`` if given); also return the head.

    The head is read first and the entries up to it after: entries commit with their head, so all of them
    are there, and entries appended meanwhile are left for the next verification. A chain whose head row is
    gone is read to its end and verified against the genesis (so its entries count as past the head).
    """
    with database.read() as connection:
        head = audit_head(connection, chain)
    entries = read_chain(database, chain, until_seq=None if head is None else head.seq, page=page)
    return verify(entries, head=head or GENESIS, anchor=anchor), head


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
