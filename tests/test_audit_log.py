"""The audit log: every event an entry of its tenant's hash chain, and the means to prove it untouched.

The pure core first (the hash covers every stored field; the verifier names each kind of tampering), then
the store on SQLite and PostgreSQL (gap-free chains under concurrent appenders, rollbacks that leave no
trace, tampering done with raw SQL and caught), then the API (tenant scoping, export, verification) and the
CLI (export → verify-file round trip, exit codes), and the event search by device, group and time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from fleetward.api import schemas
from fleetward.cli.main import app
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store import events as event_log
from fleetward.store.audit_chain import (
    GENESIS,
    GENESIS_HASH,
    HEAD_HEADER,
    ChainEntry,
    ChainPosition,
    Problem,
    entry_hash,
    from_json_line,
    parse_position,
    to_json_line,
    verify,
)
from fleetward.store.database import Database
from fleetward.store.events import Event, Severity
from fleetward.store.schema import audit_heads, events
from tests.conftest import TenantSetup, healthy_software, make_tenant

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


# ------------------------------------------------------------------ the pure core


def chain_of(count: int, chain: str = "tenant-a", *, first_id: int = 1) -> list[ChainEntry]:
    """A well-formed chain of ``count`` entries, built with nothing but :func:`entry_hash`."""
    entries: list[ChainEntry] = []
    prev = GENESIS_HASH
    for seq in range(1, count + 1):
        draft = ChainEntry(
            chain=chain,
            seq=seq,
            at=T0 + dt.timedelta(seconds=seq),
            kind="device",
            code="moved",
            severity="info",
            actor="admin@example.com",
            tenant_id=chain or None,
            device_id=f"device-{seq}",
            detail=f"event {seq}",
            prev_hash=prev,
            hash=GENESIS_HASH,
            event_id=first_id + seq - 1,
        )
        entry = dataclasses.replace(draft, hash=entry_hash(prev, draft))
        entries.append(entry)
        prev = entry.hash
    return entries


def rehash(entries: list[ChainEntry], start: int) -> list[ChainEntry]:
    """What a forger with write access does: make the chain consistent again from index ``start`` on."""
    fixed = entries[:start]
    prev = fixed[-1].hash if fixed else GENESIS_HASH
    for entry in entries[start:]:
        moved = dataclasses.replace(entry, prev_hash=prev)
        moved = dataclasses.replace(moved, hash=entry_hash(prev, moved))
        fixed.append(moved)
        prev = moved.hash
    return fixed


def test_the_hash_is_sha256_of_the_previous_hash_and_the_documented_canonical_form() -> None:
    """Pinned by hand from the formula in audit_chain's docstring (and wire.md): changing the encoding is a
    format change, not a refactoring."""
    [entry] = chain_of(1)
    expected_content = (
        b'["fleetward-audit/1","tenant-a",1,"2026-03-01T12:00:01.123456Z","device","moved","info",'
        b'"admin@example.com","tenant-a","device-1","event 1"]'
    )
    assert entry.hash == hashlib.sha256(bytes(32) + expected_content).hexdigest()
    assert entry_hash(GENESIS_HASH, entry) == entry.hash


@pytest.mark.parametrize(
    "change",
    [
        {"chain": "tenant-b"},
        {"seq": 2},
        {"at": T0 + dt.timedelta(seconds=1, microseconds=1)},
        {"kind": "claim"},
        {"code": "claimed"},
        {"severity": "warning"},
        {"actor": None},
        {"actor": ""},
        {"tenant_id": None},
        {"device_id": None},
        {"detail": "event 1 "},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_stored_field_is_covered_by_the_hash(change: dict[str, Any]) -> None:
    [entry] = chain_of(1)
    assert entry_hash(GENESIS_HASH, dataclasses.replace(entry, **change)) != entry.hash


def test_the_same_instant_in_another_time_zone_hashes_the_same() -> None:
    [entry] = chain_of(1)
    elsewhere = entry.at.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert entry_hash(GENESIS_HASH, dataclasses.replace(entry, at=elsewhere)) == entry.hash


def test_the_event_id_is_not_hashed_it_is_known_only_once_stored() -> None:
    [entry] = chain_of(1)
    assert entry_hash(GENESIS_HASH, dataclasses.replace(entry, event_id=999)) == entry.hash


def test_a_clean_chain_verifies_against_its_head_and_any_of_its_positions_as_anchor() -> None:
    entries = chain_of(20)
    head = entries[-1].position
    assert verify(entries, head=head).ok
    for anchor in (entries[0].position, entries[9].position, head, GENESIS):
        found = verify(entries, head=head, anchor=anchor)
        assert found.ok, found
        assert found.checked == 20
        assert found.last_good == head
    assert verify([], head=GENESIS).ok


def altered(entries: list[ChainEntry]) -> list[ChainEntry]:
    return [*entries[:4], dataclasses.replace(entries[4], detail="nothing happened"), *entries[5:]]


def swapped(entries: list[ChainEntry]) -> list[ChainEntry]:
    return [*entries[:4], entries[5], entries[4], *entries[6:]]


def swapped_rows(entries: list[ChainEntry]) -> list[ChainEntry]:
    """Rows 5 and 6 exchanged in the table (everything but their ids), read back by ``seq``."""
    fifth, sixth = entries[4], entries[5]
    return [
        *entries[:4],
        dataclasses.replace(fifth, event_id=sixth.event_id),
        dataclasses.replace(sixth, event_id=fifth.event_id),
        *entries[6:],
    ]


def duplicated(entries: list[ChainEntry]) -> list[ChainEntry]:
    return [*entries[:5], entries[4], *entries[5:]]


def renumbered(entries: list[ChainEntry]) -> list[ChainEntry]:
    """Entry 5 deleted and the later ones moved up one place, hashes left alone."""
    return [*entries[:4], *(dataclasses.replace(entry, seq=entry.seq - 1) for entry in entries[5:])]


def replaced(entries: list[ChainEntry]) -> list[ChainEntry]:
    """Entry 5 replaced by a self-consistent forgery: its own hash is right, the next entry does not
    follow it."""
    forged = dataclasses.replace(entries[4], detail="forged")
    forged = dataclasses.replace(forged, hash=entry_hash(forged.prev_hash, forged))
    return [*entries[:4], forged, *entries[5:]]


TAMPERING: list[tuple[str, Callable[[list[ChainEntry]], list[ChainEntry]], Problem, int]] = [
    ("an entry's detail altered", altered, Problem.HASH_MISMATCH, 5),
    ("an entry replaced by a self-consistent forgery", replaced, Problem.HASH_MISMATCH, 6),
    ("a middle entry deleted", lambda entries: entries[:4] + entries[5:], Problem.GAP, 5),
    ("the first entry deleted", lambda entries: entries[1:], Problem.GAP, 1),
    ("a middle entry deleted, the rest renumbered", renumbered, Problem.HASH_MISMATCH, 5),
    ("two entries read in swapped order", swapped, Problem.REORDERED, 5),
    ("two rows exchanged in the table", swapped_rows, Problem.REORDERED, 6),
    ("an entry repeated", duplicated, Problem.REORDERED, 5),
    ("the last entry deleted", lambda entries: entries[:-1], Problem.HEAD_MISMATCH, 10),
]


@pytest.mark.parametrize(
    ("tamper", "problem", "first_bad"),
    [case[1:] for case in TAMPERING],
    ids=[case[0] for case in TAMPERING],
)
def test_each_kind_of_tampering_is_named_with_the_first_bad_entry(
    tamper: Callable[[list[ChainEntry]], list[ChainEntry]], problem: Problem, first_bad: int
) -> None:
    entries = chain_of(10)
    found = verify(tamper(entries), head=entries[-1].position)
    assert not found.ok
    assert (found.problem, found.first_bad_seq) == (problem, first_bad), found.detail
    assert found.detail


def test_a_consistently_rewritten_tail_passes_alone_but_an_anchor_kept_from_before_catches_it() -> None:
    entries = chain_of(10)
    anchor = entries[7].position  # what an operator kept from last week's export
    forged = rehash([*entries[:5], dataclasses.replace(entries[5], detail="nothing"), *entries[6:]], 5)
    assert verify(forged, head=forged[-1].position).ok  # the limit of a hash chain on its own
    found = verify(forged, head=forged[-1].position, anchor=anchor)
    assert (found.problem, found.first_bad_seq) == (Problem.ANCHOR_MISMATCH, 8)
    assert found.last_good == forged[6].position


def test_a_consistently_cut_tail_passes_alone_but_an_anchor_past_the_end_catches_it() -> None:
    entries = chain_of(10)
    cut = entries[:7]
    assert verify(cut, head=cut[-1].position).ok
    found = verify(cut, head=cut[-1].position, anchor=entries[-1].position)
    assert (found.problem, found.first_bad_seq) == (Problem.ANCHOR_MISMATCH, 10)


def test_a_head_that_names_another_entry_is_a_head_mismatch() -> None:
    entries = chain_of(5)
    found = verify(entries, head=ChainPosition(5, "ab" * 32))
    assert (found.problem, found.first_bad_seq) == (Problem.HEAD_MISMATCH, 5)
    assert verify(entries, head=GENESIS).problem is Problem.HEAD_MISMATCH  # entries, but no head


def test_a_later_part_of_a_chain_verifies_from_the_position_it_continues() -> None:
    entries = chain_of(10)
    start = entries[3].position
    assert verify(entries[4:], start=start, head=entries[-1].position).ok
    assert verify(entries[4:], start=start, anchor=start).ok
    wrong = verify(entries[4:], start=start, anchor=entries[2].position)
    assert wrong.problem is Problem.ANCHOR_MISMATCH


def test_verification_reads_its_entries_lazily_one_at_a_time() -> None:
    consumed: list[int] = []

    def entries() -> Iterator[ChainEntry]:
        for entry in altered(chain_of(50)):
            consumed.append(entry.seq)
            yield entry

    assert verify(entries()).first_bad_seq == 5
    assert consumed == [1, 2, 3, 4, 5]  # stopped at the first bad entry, held nothing else


@pytest.mark.parametrize(
    "text",
    ["", "12", "12:", ":" + "a" * 64, "-1:" + "a" * 64, "1:" + "a" * 63, "1:" + "g" * 64, "x" * 200],
)
def test_an_anchor_that_is_not_seq_colon_hash_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"SEQ:HASH|hex"):
        parse_position(text)


def test_an_anchor_reads_back_from_its_printed_form() -> None:
    position = chain_of(3)[-1].position
    assert parse_position(str(position)) == position
    assert parse_position(str(position).upper()) == position


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)


@given(
    detail=texts,
    actor=st.none() | texts,
    device_id=st.none() | st.text(max_size=64),
    micro=st.integers(0, 999_999),
)
def test_an_export_line_round_trips_any_entry(
    detail: str, actor: str | None, device_id: str | None, micro: int
) -> None:
    [entry] = chain_of(1)
    entry = dataclasses.replace(
        entry, detail=detail, actor=actor, device_id=device_id, at=T0.replace(microsecond=micro)
    )
    entry = dataclasses.replace(entry, hash=entry_hash(GENESIS_HASH, entry))
    line = to_json_line(entry)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert from_json_line(line.rstrip(b"\n")) == entry
    assert schemas.AuditEntryPublic.model_validate_json(line).seq == 1


def good_line() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(to_json_line(chain_of(1)[0]))
    return loaded


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json", "not a JSON line"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not a JSON line"),
        (b" " * (64 * 1024 + 1), "at most"),
        (json.dumps({**good_line(), "seq": "1"}).encode(), "int"),
        (json.dumps({**good_line(), "seq": 0}).encode(), "1 or more"),
        (json.dumps({**good_line(), "hash": "A" * 64}).encode(), "hex"),
        (json.dumps({**good_line(), "at": "2026-03-01T12:00:01Z"}).encode(), "fixed form"),
        (json.dumps({**good_line(), "at": "2026-03-01T12:00:01.000000+00:00"}).encode(), "ending in Z"),
        (json.dumps({**good_line(), "detail": 5}).encode(), "str"),
        (json.dumps({**good_line(), "kind": "k" * 65}).encode(), "longer than"),
        (json.dumps({key: value for key, value in good_line().items() if key != "prev_hash"}).encode(), "no"),
    ],
    ids=lambda value: value[:24] if isinstance(value, str) else None,
)
def test_a_line_that_is_not_an_export_entry_is_refused_with_the_reason(line: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        from_json_line(line)


# ------------------------------------------------------------------ the store, on SQLite and PostgreSQL


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    store = Database(database_url)
    store.upgrade()
    yield store
    store.dispose()


def event(tenant_id: str | None, number: int, **fields: Any) -> Event:
    return Event(
        at=fields.pop("at", T0 + dt.timedelta(seconds=number)),
        kind=fields.pop("kind", "test"),
        code=fields.pop("code", "happened"),
        detail=fields.pop("detail", f"event {number}"),
        tenant_id=tenant_id,
        **fields,
    )


def append(database: Database, *items: Event) -> None:
    with database.write() as connection:
        event_log.record(connection, list(items))


def stored_chain(database: Database, chain: str) -> list[ChainEntry]:
    return list(event_log.read_chain(database, chain, page=7))


def raw(database: Database, statement: Any) -> None:
    with database.write() as connection:
        connection.execute(statement)


def row_of(chain: str, seq: int) -> Any:
    return sa.and_(events.c.chain == chain, events.c.chain_seq == seq)


def test_each_event_becomes_the_next_entry_of_its_tenants_chain(database: Database) -> None:
    append(database, event("tenant-a", 1), event(None, 2), event("tenant-b", 3), event("tenant-a", 4))
    append(database, event("tenant-b", 5, detail="x" * 5000), event("tenant-a", 6))
    chains = {chain: stored_chain(database, chain) for chain in ("tenant-a", "tenant-b", "")}
    assert [entry.detail for entry in chains["tenant-a"]] == ["event 1", "event 4", "event 6"]
    assert [entry.detail[:7] for entry in chains["tenant-b"]] == ["event 3", "xxxxxxx"]
    assert [entry.detail for entry in chains[""]] == ["event 2"]
    for chain, entries in chains.items():
        assert [entry.seq for entry in entries] == list(range(1, len(entries) + 1))
        assert entries[0].prev_hash == GENESIS_HASH
        assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(entries))
        found, head = event_log.verify_chain(database, chain)
        assert found.ok, found
        assert head == entries[-1].position
    # the stored detail is cut to 2,000 characters, and the hash covers what is stored
    assert len(chains["tenant-b"][1].detail) == 2000
    assert chains["tenant-b"][1].at == T0 + dt.timedelta(seconds=5)


def test_a_rolled_back_transaction_leaves_no_entry_and_no_gap(database: Database) -> None:
    append(database, event("tenant-a", 1))

    def change_that_fails() -> None:
        with database.write() as connection:
            event_log.record(connection, [event("tenant-a", 2), event("tenant-new", 3)])
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError, match="the change failed"):
        change_that_fails()
    with database.read() as connection:
        assert event_log.audit_head(connection, "tenant-new") is None
        assert event_log.audit_head(connection, "tenant-a") == stored_chain(database, "tenant-a")[0].position
    append(database, event("tenant-a", 4))
    assert [(entry.seq, entry.detail) for entry in stored_chain(database, "tenant-a")] == [
        (1, "event 1"),
        (2, "event 4"),
    ]
    assert event_log.verify_chain(database, "tenant-a")[0].ok


def test_concurrent_appenders_never_leave_a_gap_or_share_a_position(
    database: Database, database_url: str
) -> None:
    """Two stores on the same database (as two processes would have) and four threads each append batches
    that touch the chains in random orders; each transaction lingers after appending."""
    stores = [Database(database_url) for _ in range(2)]
    chains: list[str | None] = ["tenant-a", "tenant-b", None]
    per_thread, threads = 15, 8
    barrier = threading.Barrier(threads)

    def appender(number: int) -> int:
        store = stores[number % 2]
        randomness = random.Random(number)  # noqa: S311 (an order, not a secret)
        barrier.wait(timeout=30)
        appended = 0
        for index in range(per_thread):
            batch = randomness.sample(chains, k=randomness.randint(1, 3))
            with store.write() as connection:
                event_log.record(connection, [event(chain, index, actor=f"t{number}") for chain in batch])
                time.sleep(0.001)  # hold the heads a while: the others queue behind them
            appended += len(batch)
        return appended

    try:
        with ThreadPoolExecutor(threads) as pool:
            appended = sum(pool.map(appender, range(threads)))
        with stores[0].read() as connection:
            rows = connection.execute(sa.select(events.c.chain, events.c.chain_seq)).all()
        assert len(rows) == len(set(rows)) == appended
        for chain in ("tenant-a", "tenant-b", ""):
            positions = sorted(seq for name, seq in rows if name == chain)
            assert positions == list(range(1, len(positions) + 1))
            found, head = event_log.verify_chain(stores[0], chain)
            assert found.ok, found
            assert head is not None
            assert head.seq == len(positions)
    finally:
        for store in stores:
            store.dispose()


@pytest.fixture
def ten(database: Database) -> list[ChainEntry]:
    """Ten entries in tenant-a's chain, with others' entries in between."""
    for number in range(1, 11):
        append(database, event("tenant-a", number), event("tenant-b", number))
    return stored_chain(database, "tenant-a")


def swap_rows(database: Database, first: int, second: int) -> None:
    """Exchange two rows of the event table, all but their ids (a raw UPDATE, as an intruder would)."""
    columns = [column for column in events.c if column.name != "id"]
    with database.write() as connection:
        one = connection.execute(sa.select(*columns).where(row_of("tenant-a", first))).one()._asdict()
        two = connection.execute(sa.select(*columns).where(row_of("tenant-a", second))).one()._asdict()
        connection.execute(events.update().where(row_of("tenant-a", first)).values(chain_seq=None))
        connection.execute(events.update().where(row_of("tenant-a", second)).values(**one))
        connection.execute(
            events.update().where(events.c.chain == "tenant-a", events.c.chain_seq.is_(None)).values(**two)
        )


STORE_TAMPERING: list[tuple[str, Callable[[Database], None], Problem, int]] = [
    (
        "a detail altered",
        lambda db: raw(db, events.update().where(row_of("tenant-a", 4)).values(detail="all is well")),
        Problem.HASH_MISMATCH,
        4,
    ),
    (
        "an entry moved to another tenant",
        lambda db: raw(db, events.update().where(row_of("tenant-a", 4)).values(tenant_id="tenant-b")),
        Problem.HASH_MISMATCH,
        4,
    ),
    (
        "a middle row deleted",
        lambda db: raw(db, events.delete().where(row_of("tenant-a", 5))),
        Problem.GAP,
        5,
    ),
    (
        "the last row deleted",
        lambda db: raw(db, events.delete().where(row_of("tenant-a", 10))),
        Problem.HEAD_MISMATCH,
        10,
    ),
    (
        "the head row deleted",
        lambda db: raw(db, audit_heads.delete().where(audit_heads.c.chain == "tenant-a")),
        Problem.HEAD_MISMATCH,
        1,
    ),
    ("two rows swapped", lambda db: swap_rows(db, 3, 4), Problem.REORDERED, 4),
]


@pytest.mark.parametrize(
    ("tamper", "problem", "first_bad"),
    [case[1:] for case in STORE_TAMPERING],
    ids=[case[0] for case in STORE_TAMPERING],
)
def test_tampering_with_the_stored_chain_is_detected_with_its_reason(
    database: Database,
    ten: list[ChainEntry],
    tamper: Callable[[Database], None],
    problem: Problem,
    first_bad: int,
) -> None:
    assert event_log.verify_chain(database, "tenant-a")[0].ok
    tamper(database)
    found, _head = event_log.verify_chain(database, "tenant-a", page=3)
    assert (found.problem, found.first_bad_seq) == (problem, first_bad), found.detail
    assert event_log.verify_chain(database, "tenant-b")[0].ok  # the other tenant's chain is untouched


def forge_tail(database: Database, entries: list[ChainEntry], start: int, **change: Any) -> None:
    """Rewrite the chain from index ``start`` on so that it is consistent again, head included."""
    forged = rehash(
        [*entries[:start], dataclasses.replace(entries[start], **change), *entries[start + 1 :]], start
    )
    with database.write() as connection:
        for entry in forged[start:]:
            connection.execute(
                events.update()
                .where(row_of(entry.chain, entry.seq))
                .values(detail=entry.detail, prev_hash=entry.prev_hash, hash=entry.hash)
            )
        connection.execute(
            audit_heads.update().where(audit_heads.c.chain == forged[-1].chain).values(hash=forged[-1].hash)
        )


def test_a_consistent_rewrite_of_the_stored_tail_is_caught_by_an_anchor_exported_before(
    database: Database, ten: list[ChainEntry]
) -> None:
    anchor = ten[-1].position
    forge_tail(database, ten, 6, detail="certificate issued as usual")
    assert event_log.verify_chain(database, "tenant-a")[0].ok
    found, _head = event_log.verify_chain(database, "tenant-a", anchor=anchor)
    assert (found.problem, found.first_bad_seq) == (Problem.ANCHOR_MISMATCH, 10)


# ------------------------------------------------------------------ the API and the CLI


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    cleaned: dict[str, str | None] = {name: None for name in os.environ if name.startswith("FLEETWARD_")}
    cleaned["FLEETWARD_CLI_CONFIG"] = str(tmp_path / "cli.json")
    return cleaned


def operator(admin: FleetwardClient, email: str, *, can_create_tenants: bool) -> str:
    created = admin.post(
        "/v1/operators",
        schemas.OperatorCreate(email=email, name=email.split("@")[0], can_create_tenants=can_create_tenants),
        schemas.OperatorCreated,
    )
    return created.token


def export(http: httpx.Client, path: str, **params: int) -> tuple[httpx.Response, list[ChainEntry]]:
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response, [from_json_line(line.encode()) for line in response.text.splitlines()]


def enroll(server: BackgroundServer, device: SimulatedDevice) -> None:
    import asyncio

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            await device.enroll(server.url, http)

    asyncio.run(run())


def test_entries_of_several_services_form_one_gap_free_chain_per_tenant_scoped_to_it(
    server: BackgroundServer,
    admin: FleetwardClient,
    admin_token: str,
    tenant: TenantSetup,
) -> None:
    device = SimulatedDevice("panel-001", healthy_software())
    tenant.claim(device)
    enroll(server, device)  # the authority: certificate issued
    admin.post(
        f"/v1/tenants/{tenant.id}/devices/{device.device_id}/revoke", schemas.Revoke(), schemas.RevokedDevice
    )
    bob_token = operator(admin, "bob@example.com", can_create_tenants=True)
    with FleetwardClient(server.url, bob_token) as bob_client:
        lab = make_tenant(bob_client, "lab")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {bob_token}"}) as bob:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
            response, farm = export(http, f"/v1/tenants/{tenant.id}/audit-log")
            assert response.headers["content-type"] == "application/x-ndjson"
            assert response.headers[HEAD_HEADER] == str(farm[-1].position)
            kinds = {entry.kind for entry in farm}
            assert {"tenant", "authority", "product", "claim", "attestation", "revocation"} <= kinds, kinds
            assert [entry.seq for entry in farm] == list(range(1, len(farm) + 1))
            assert {entry.chain for entry in farm} == {entry.tenant_id for entry in farm} == {tenant.id}
            # every event of the tenant is an entry of its chain, and nothing else is (background work may
            # have recorded more since the export: those come after it)
            listed = [event.id or 0 for event in tenant.events(limit=1000)]
            last_id = farm[-1].event_id or 0
            assert sorted(id_ for id_ in listed if id_ <= last_id) == [entry.event_id for entry in farm]
            checked = http.get(f"/v1/tenants/{tenant.id}/audit-log/verify").json()
            assert checked["ok"] is True
            assert checked["entries_checked"] == checked["head"]["seq"] >= len(farm)

            # bob's tenant has its own chain; neither sees the other's
            _response, mine = export(bob, f"/v1/tenants/{lab.id}/audit-log")
            assert mine
            assert {entry.chain for entry in mine} == {lab.id}
            assert not {entry.hash for entry in mine} & {entry.hash for entry in farm}
            for path in ("audit-log", "audit-log/verify"):
                refused = bob.get(f"/v1/tenants/{tenant.id}/{path}")
                assert (refused.status_code, refused.json()["error"]["code"]) == (403, "no_role_in_tenant")

            # the chain of no tenant: platform operators only
            _response, platform = export(http, "/v1/audit-log")
            assert platform
            assert {entry.chain for entry in platform} == {""}
            assert {entry.tenant_id for entry in platform} == {None}
            assert http.get("/v1/audit-log/verify").json()["ok"] is True
        reader = operator(admin, "carol@example.com", can_create_tenants=False)
        for path in ("/v1/audit-log", "/v1/audit-log/verify"):
            refused = bob.get(path, headers={"Authorization": f"Bearer {reader}"})
            assert (refused.status_code, refused.json()["error"]["code"]) == (403, "cannot_create_tenants")


def test_an_export_pages_with_after_seq_and_limit_and_refuses_what_is_out_of_bounds(
    server: BackgroundServer, admin_token: str, tenant: TenantSetup, services: Services
) -> None:
    append(services.database, *(event(tenant.id, number) for number in range(30)))
    base = f"/v1/tenants/{tenant.id}/audit-log"
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        _response, everything = export(http, base)
        _response, page = export(http, base, after_seq=5, limit=7)
        assert page == everything[5:12]
        assert verify(page, start=everything[4].position).ok
        _response, beyond = export(http, base, after_seq=everything[-1].seq)
        assert beyond == []
        for params in ({"limit": 0}, {"limit": 100_001}, {"after_seq": -1}):
            assert http.get(base, params=params).status_code == 422, params
        refused = http.get(f"{base}/verify", params={"anchor": "12"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "bad_anchor")
        raw(services.database, events.delete().where(row_of(tenant.id, 9)))
        checked = http.get(f"{base}/verify", params={"anchor": str(everything[-1].position)}).json()
        assert (checked["ok"], checked["problem"], checked["first_bad_seq"]) == (False, "gap", 9)
        assert checked["last_verified"] == {"seq": 8, "hash": everything[7].hash}


def cli(env: dict[str, str | None], url: str, token: str, *args: str) -> Result:
    return CliRunner().invoke(app, ["--url", url, "--token", token, *args], env=env)


def test_export_then_verify_file_round_trips_and_the_exit_codes_tell_tampering(
    server: BackgroundServer,
    admin_token: str,
    tenant: TenantSetup,
    services: Services,
    env: dict[str, str | None],
    tmp_path: Path,
) -> None:
    append(
        services.database, *(event(tenant.id, number, detail=f"détail {number}\n") for number in range(12))
    )
    exported = tmp_path / "audit.jsonl"
    result = cli(
        env, server.url, admin_token, "audit-log", "export", "--tenant", "solar-farm", "-o", str(exported)
    )
    assert result.exit_code == 0, result.output
    lines = exported.read_bytes().splitlines()
    last = from_json_line(lines[-1])
    assert result.stderr.strip() == f"head {last.position}"
    anchor = str(last.position)

    verified = CliRunner().invoke(
        app, ["audit-log", "verify-file", str(exported), "--anchor", anchor], env=env
    )
    assert verified.exit_code == 0, verified.output
    assert f"ok: {len(lines)} entries" in verified.stdout

    online = cli(
        env, server.url, admin_token, "audit-log", "verify", "--tenant", "solar-farm", "--anchor", anchor
    )
    assert online.exit_code == 0, online.output

    def tampered(name: str, new_lines: list[bytes]) -> Result:
        path = tmp_path / name
        path.write_bytes(b"\n".join(new_lines) + b"\n")
        return CliRunner().invoke(app, ["audit-log", "verify-file", str(path)], env=env)

    record = json.loads(lines[3])
    edited = tampered("edited", [*lines[:3], json.dumps({**record, "detail": "x"}).encode(), *lines[4:]])
    assert edited.exit_code == 1, edited.output
    assert "entry 4: hash_mismatch" in edited.stdout
    swapped = tampered("swapped", [*lines[:3], lines[4], lines[3], *lines[5:]])
    assert swapped.exit_code == 1
    assert "reordered" in swapped.stdout
    removed = tampered("removed", [*lines[:3], *lines[4:]])
    assert removed.exit_code == 1
    assert "gap" in removed.stdout
    garbage = tampered("garbage", [*lines[:3], b"{not json", *lines[4:]])
    assert garbage.exit_code == 2
    assert "line 4" in garbage.stderr

    # a later part of the chain, tied by the anchor at its start
    part = tmp_path / "part.jsonl"
    middle = from_json_line(lines[4]).position
    args = ["audit-log", "export", "--tenant", "solar-farm", "--after-seq", str(middle.seq), "-o", str(part)]
    assert cli(env, server.url, admin_token, *args).exit_code == 0
    again = CliRunner().invoke(app, ["audit-log", "verify-file", str(part), "--anchor", str(middle)], env=env)
    assert again.exit_code == 0, again.output

    # the tail rewritten on the server: the anchor kept from the export catches it
    stored = list(event_log.read_chain(services.database, tenant.id))
    forge_tail(services.database, stored, len(lines) - 3, detail="nothing to see")
    online = cli(
        env, server.url, admin_token, "audit-log", "verify", "--tenant", "solar-farm", "--anchor", anchor
    )
    assert online.exit_code == 1, online.output
    assert "anchor_mismatch" in online.stdout
    plain = cli(env, server.url, admin_token, "audit-log", "verify", "--tenant", "solar-farm")
    assert plain.exit_code == 0  # without an anchor, a consistent rewrite is out of a chain's reach
    bad = cli(env, server.url, admin_token, "audit-log", "verify", "--tenant", "solar-farm", "--anchor", "x")
    assert bad.exit_code == 2


def test_the_platform_chain_exports_through_the_cli(
    server: BackgroundServer, admin_token: str, env: dict[str, str | None], tmp_path: Path
) -> None:
    result = cli(env, server.url, admin_token, "audit-log", "export", "--platform", "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    entries = [from_json_line(line) for line in (tmp_path / "p").read_bytes().splitlines()]
    assert entries
    assert {entry.chain for entry in entries} == {""}
    checked = cli(env, server.url, admin_token, "--json", "audit-log", "verify", "--platform")
    assert checked.exit_code == 0
    assert json.loads(checked.stdout)["entries_checked"] >= len(entries)  # more may come meanwhile


# ------------------------------------------------------------------ searching events by device, group, time


def test_events_are_searched_by_group_time_code_and_severity(
    server: BackgroundServer,
    admin_token: str,
    tenant: TenantSetup,
    services: Services,
    clock: FakeClock,
    env: dict[str, str | None],
) -> None:
    field, lab = SimulatedDevice("field-1", ()), SimulatedDevice("lab-1", ())
    tenant.claim(field, group="Field Test")
    tenant.claim(lab, group="Production")
    start = clock.now()
    append(
        services.database,
        event(tenant.id, 1, at=start + dt.timedelta(hours=1), device_id=field.device_id, code="odd"),
        event(
            tenant.id,
            2,
            at=start + dt.timedelta(hours=2),
            device_id=lab.device_id,
            code="odd",
            severity=Severity.CRITICAL,
        ),
        event(tenant.id, 3, at=start + dt.timedelta(hours=3), device_id=field.device_id, code="odd"),
        event("another-tenant", 4, at=start + dt.timedelta(hours=3), device_id=field.device_id, code="odd"),
    )

    def details(**params: str | int) -> list[str]:
        return [event.detail for event in tenant.events(code="odd", **params)]

    assert details() == ["event 3", "event 2", "event 1"]
    assert details(group_id=tenant.groups["Field Test"].id) == ["event 3", "event 1"]
    assert details(group_id=tenant.groups["Production"].id) == ["event 2"]
    assert details(severity="critical") == ["event 2"]
    assert details(since=(start + dt.timedelta(hours=2)).isoformat()) == ["event 3", "event 2"]
    assert details(until=(start + dt.timedelta(hours=2)).isoformat()) == ["event 1"]
    window = {
        "since": (start + dt.timedelta(hours=2)).isoformat(),
        "until": (start + dt.timedelta(hours=3)).isoformat(),
    }
    assert details(**window) == ["event 2"]
    assert details(device_id=field.device_id, limit=1) == ["event 3"]
    assert [event.code for event in tenant.events(kind="claim", group_id=tenant.groups["Production"].id)] == [
        "claimed"
    ]

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        base = f"/v1/tenants/{tenant.id}/events"
        backwards = http.get(base, params={"since": window["until"], "until": window["since"]})
        assert (backwards.status_code, backwards.json()["error"]["code"]) == (400, "bad_time_range")
        for params in ({"limit": 0}, {"limit": 1001}, {"severity": "loud"}, {"until": "yesterday"}):
            assert http.get(base, params=params).status_code == 422, params

    listed = cli(
        env,
        server.url,
        admin_token,
        "--json",
        "event",
        "list",
        "--tenant",
        "solar-farm",
        "--group-id",
        tenant.groups["Field Test"].id,
        "--code",
        "odd",
        "--since",
        (start + dt.timedelta(hours=2)).isoformat(),
    )
    assert listed.exit_code == 0, listed.output
    assert [item["detail"] for item in json.loads(listed.stdout)] == ["event 3"]
