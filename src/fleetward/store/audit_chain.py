"""The audit log's pure core: how an event becomes a hash-chained entry, and how a chain is verified. No I/O.

Every event fleetward records is an entry of its tenant's chain (``""`` for events of no tenant), at a
gap-free position ``seq`` 1, 2, 3… (ADR 0016). An entry's hash covers everything stored of it and the hash
of the entry before it::

    hash = sha256(bytes.fromhex(prev_hash) || canonical(entry))

where :func:`canonical` is the JSON array (ASCII, no spaces)
``["fleetward-audit/1", chain, seq, at, kind, code, severity, actor, tenant_id, device_id, detail]``
with ``at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC) and ``null`` for what is absent. The first entry's
``prev_hash`` is :data:`GENESIS_HASH` (64 zeros).

:func:`verify` walks entries in order, holding nothing but the last one it checked (bounded memory for a
chain of any length) and says where the first tampering is and what kind it is: an entry altered
(``hash_mismatch``), one deleted (``gap``), entries out of order (``reordered``), the tail cut or the head
moved (``head_mismatch``), or a position an operator kept from an earlier export that the chain no longer
holds (``anchor_mismatch``).

Exports are JSON lines, one entry each (:func:`to_json_line`, :func:`from_json_line`); an exported file
verifies with no server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

GENESIS_HASH = "0" * 64
FORMAT = "fleetward-audit/1"
#: the HTTP header of an export that gives the chain's head (SEQ:HASH) when the export began
HEAD_HEADER = "Fleetward-Audit-Head"
#: the longest export line :func:`from_json_line` reads (a stored detail is at most 2,000 characters; JSON
#: escapes at most six times that)
MAX_LINE_BYTES = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))  # one, not one per entry
_TEXT_LIMITS = {"chain": 64, "kind": 64, "code": 64, "severity": 16, "actor": 256, "tenant_id": 64}


class ChainPosition(NamedTuple):
    """Where a chain stands: the position of an entry and its hash (a head, or an anchor kept by hand)."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


GENESIS = ChainPosition(0, GENESIS_HASH)


def position(seq: int, hash_: str) -> ChainPosition:
    """A validated :class:`ChainPosition`: ``seq`` ≥ 0 and a lowercase hex SHA-256."""
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise TypeError("a chain position is an int")
    if seq < 0:
        raise ValueError("a chain position is 0 or more")
    _check_hash(hash_, "hash")
    return ChainPosition(seq, hash_)


def parse_position(text: str) -> ChainPosition:
    """``"SEQ:HASH"`` (an anchor as an operator types it); ``ValueError`` says what is wrong."""
    if len(text) > 96:
        raise ValueError("an anchor is SEQ:HASH (a number, a colon, 64 hex digits)")
    seq, colon, hash_ = text.strip().partition(":")
    if not colon or not seq.isdigit():
        raise ValueError(f"an anchor is SEQ:HASH (a number, a colon, 64 hex digits), not {text[:24]!r}…")
    return position(int(seq), hash_.lower())


def _check_hash(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} is a str")
    if not _HEX64.fullmatch(value):
        raise ValueError(f"{name} is 64 lowercase hex digits")


def format_time(moment: dt.datetime) -> str:
    """The fixed form of ``at`` in the hash and in exports: UTC, microseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("an audit entry's time is timezone-aware")
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True)
class ChainEntry:
    """One entry of an audit chain: an event as stored, its position, and the hashes that chain it.

    ``event_id`` is the row's id in the event table: not hashed (it is known only once stored), but rows
    are inserted in chain order, so ids grow with ``seq`` and :func:`verify` checks that they do.
    """

    chain: str
    seq: int
    at: dt.datetime
    kind: str
    code: str
    severity: str
    actor: str | None
    tenant_id: str | None
    device_id: str | None
    detail: str
    prev_hash: str
    hash: str
    event_id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seq, int) or isinstance(self.seq, bool):
            raise TypeError("seq is an int")
        if self.seq < 1:
            raise ValueError("an entry's seq is 1 or more")
        if not isinstance(self.at, dt.datetime) or self.at.tzinfo is None:
            raise ValueError("an entry's time is a timezone-aware datetime")
        for name in ("chain", "kind", "code", "severity", "detail"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is a str")
        for name in ("actor", "tenant_id", "device_id"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is a str or None")
        _check_hash(self.prev_hash, "prev_hash")
        _check_hash(self.hash, "hash")
        if self.event_id is not None and (
            not isinstance(self.event_id, int) or isinstance(self.event_id, bool)
        ):
            raise TypeError("event_id is an int or None")

    @property
    def position(self) -> ChainPosition:
        return ChainPosition(self.seq, self.hash)


def canonical(
    *,
    chain: str,
    seq: int,
    at: dt.datetime,
    kind: str,
    code: str,
    severity: str,
    actor: str | None,
    tenant_id: str | None,
    device_id: str | None,
    detail: str,
) -> bytes:
    """The bytes an entry's hash covers (after the previous hash): every stored field, in a fixed order."""
    fields = [FORMAT, chain, seq, format_time(at), kind, code, severity, actor, tenant_id, device_id, detail]
    return _CANONICAL_JSON.encode(fields).encode("ascii")


def chained_hash(prev_hash: str, content: bytes) -> str:
    """``sha256(prev_hash || content)``, the previous hash taken as its 32 bytes."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + content).hexdigest()


def entry_hash(prev_hash: str, entry: ChainEntry) -> str:
    """What ``entry.hash`` must be if ``entry`` follows an entry whose hash is ``prev_hash``."""
    _check_hash(prev_hash, "prev_hash")
    return chained_hash(prev_hash, _canonical_of(entry))


def _canonical_of(entry: ChainEntry) -> bytes:
    return canonical(
        chain=entry.chain,
        seq=entry.seq,
        at=entry.at,
        kind=entry.kind,
        code=entry.code,
        severity=entry.severity,
        actor=entry.actor,
        tenant_id=entry.tenant_id,
        device_id=entry.device_id,
        detail=entry.detail,
    )


class Problem(StrEnum):
    """Why a chain failed verification."""

    HASH_MISMATCH = "hash_mismatch"  # an entry was altered: its content no longer gives its hash
    GAP = "gap"  # an entry is missing: one was deleted
    REORDERED = "reordered"  # entries are out of order (or one appears twice)
    HEAD_MISMATCH = "head_mismatch"  # the chain does not end where its head says: the tail was cut
    ANCHOR_MISMATCH = "anchor_mismatch"  # the chain no longer holds a position kept from before


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found. ``last_good`` is the last entry that verified (``None``: none did)."""

    checked: int
    last_good: ChainPosition | None
    problem: Problem | None = None
    first_bad_seq: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(
    entries: Iterable[ChainEntry],
    *,
    head: ChainPosition | None = None,
    anchor: ChainPosition | None = None,
    start: ChainPosition = GENESIS,
) -> Verification:
    """Check that ``entries`` (in the order read: by ``seq``) form an unbroken chain from ``start``.

    ``head``: where the chain is recorded to end (its ``audit_heads`` row); the entries must end exactly
    there. ``anchor``: a position kept from an earlier export; the chain must still hold it. ``start``: the
    position the entries continue from (the genesis for a whole chain; the entry before the first one for
    an export that begins later). Stops at the first problem (after a jump in ``seq``, it reads on without
    holding anything to tell a deleted entry from a misplaced one); ``first_bad_seq`` is the position where
    the chain stops being what it should be.
    """
    previous = start
    last_id: int | None = None
    checked = 0
    anchor_seen = anchor is None
    if anchor is not None and anchor.seq <= start.seq:
        if anchor.seq < start.seq or anchor.hash != start.hash:
            return _failed(checked, None, Problem.ANCHOR_MISMATCH, anchor.seq, _anchor_detail(anchor))
        anchor_seen = True

    def last_good() -> ChainPosition | None:
        return previous if checked else None

    stream = iter(entries)
    for entry in stream:
        expected = previous.seq + 1
        if entry.seq < expected:
            return _failed(
                checked,
                last_good(),
                Problem.REORDERED,
                entry.seq,
                f"entry {entry.seq} comes after entry {previous.seq}",
            )
        if entry.seq > expected:
            if any(later.seq == expected for later in stream):  # read on (holding nothing) to tell which
                why = f"entry {expected} comes later, after entry {entry.seq}"
                return _failed(checked, last_good(), Problem.REORDERED, expected, why)
            missing = (
                f"entries {expected}…{entry.seq - 1} are"
                if entry.seq > expected + 1
                else f"entry {expected} is"
            )
            return _failed(checked, last_good(), Problem.GAP, expected, f"{missing} missing")
        if entry.event_id is not None:
            if last_id is not None and entry.event_id <= last_id:
                return _failed(
                    checked,
                    last_good(),
                    Problem.REORDERED,
                    entry.seq,
                    f"entry {entry.seq} was stored before entry {previous.seq} (event {entry.event_id} "
                    f"after event {last_id})",
                )
            last_id = entry.event_id
        if entry_hash(entry.prev_hash, entry) != entry.hash:
            return _failed(
                checked,
                last_good(),
                Problem.HASH_MISMATCH,
                entry.seq,
                f"entry {entry.seq} was altered: its content does not give its hash",
            )
        if entry.prev_hash != previous.hash:
            return _failed(
                checked,
                last_good(),
                Problem.HASH_MISMATCH,
                entry.seq,
                f"entry {entry.seq} does not follow entry {previous.seq}: its previous hash is not that "
                "entry's hash (the entry before it was altered or replaced)",
            )
        if anchor is not None and entry.seq == anchor.seq:
            if entry.hash != anchor.hash:
                detail = _anchor_detail(anchor)
                return _failed(checked, last_good(), Problem.ANCHOR_MISMATCH, entry.seq, detail)
            anchor_seen = True
        previous = entry.position
        checked += 1
    if head is not None and previous != head:
        if previous.seq < head.seq:
            why = f"the chain ends at entry {previous.seq} but its head is entry {head.seq}: the tail was cut"
        elif previous.seq > head.seq:
            why = f"the chain goes on to entry {previous.seq} past its head, entry {head.seq}"
        else:
            why = f"entry {previous.seq} is not the entry the head names (the head was moved)"
        first_bad = head.seq if previous.seq == head.seq else min(previous.seq, head.seq) + 1
        return _failed(checked, last_good(), Problem.HEAD_MISMATCH, first_bad, why)
    if not anchor_seen:
        assert anchor is not None
        return _failed(
            checked,
            last_good(),
            Problem.ANCHOR_MISMATCH,
            anchor.seq,
            f"the chain ends at entry {previous.seq}, before the anchor (entry {anchor.seq}): it was cut",
        )
    return Verification(checked=checked, last_good=last_good())


def _anchor_detail(anchor: ChainPosition) -> str:
    return f"entry {anchor.seq} is no longer the entry anchored as {anchor}: the chain was rewritten"


def _failed(
    checked: int, last_good: ChainPosition | None, problem: Problem, seq: int, detail: str
) -> Verification:
    return Verification(
        checked=checked, last_good=last_good, problem=problem, first_bad_seq=seq, detail=detail
    )


# ---------------------------------------------------------------------- export lines


def to_json_line(entry: ChainEntry) -> bytes:
    """One export line (with its newline): the entry as a JSON object (wire.md, "The audit log")."""
    record = {
        "chain": entry.chain,
        "seq": entry.seq,
        "at": format_time(entry.at),
        "kind": entry.kind,
        "code": entry.code,
        "severity": entry.severity,
        "actor": entry.actor,
        "tenant_id": entry.tenant_id,
        "device_id": entry.device_id,
        "detail": entry.detail,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
        "event_id": entry.event_id,
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def from_json_line(line: bytes) -> ChainEntry:
    """An entry from an export line; ``ValueError`` for a line that is not one (too long, not JSON, a field
    missing or of the wrong type)."""
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"an audit line is at most {MAX_LINE_BYTES} bytes")
    try:
        record: Any = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a JSON line") from None
    if not isinstance(record, dict):
        raise ValueError("an audit line is a JSON object")
    try:
        at_text = record["at"]
        if not isinstance(at_text, str) or not at_text.endswith("Z"):
            raise ValueError("at is a UTC time ending in Z")
        at = dt.datetime.fromisoformat(at_text)
        for name, bound in _TEXT_LIMITS.items():
            value = record[name]
            if isinstance(value, str) and len(value) > bound:
                raise ValueError(f"{name} is longer than {bound} characters")
        entry = ChainEntry(
            chain=record["chain"],
            seq=record["seq"],
            at=at,
            kind=record["kind"],
            code=record["code"],
            severity=record["severity"],
            actor=record["actor"],
            tenant_id=record["tenant_id"],
            device_id=record["device_id"],
            detail=record["detail"],
            prev_hash=record["prev_hash"],
            hash=record["hash"],
            event_id=record.get("event_id"),
        )
    except KeyError as missing:
        raise ValueError(f"an audit line has no {missing.args[0]!r}") from None
    except TypeError as error:
        raise ValueError(str(error)) from None
    if format_time(entry.at) != at_text:
        raise ValueError("at is not in the fixed form YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return entry
