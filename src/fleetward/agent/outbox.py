"""The agent's store-and-forward telemetry queue: every message stays on disk until the hub acknowledged it.

A SQLite database in the agent's state directory (``outbox.db``; WAL, ``synchronous=FULL``), used by one
agent at a time (an exclusive ``flock`` on ``outbox.db.lock``):

- **put**: :meth:`Outbox.put` returns once the message is committed to disk. Puts that arrive while a
  commit is under way go into the next one (group commit: one transaction, one flush, per batch). Each
  message gets a message id, a random UUID, stored with it and sent as the system property ``$.mid`` on
  every attempt, so that the cloud side can recognise a message it received twice.
- **send**: :meth:`Outbox.take` hands out the oldest messages not yet handed out, in order, and marks
  them in flight (in memory). :meth:`Outbox.acknowledge` deletes them once the hub sent its PUBACK (QoS 1:
  the hub acknowledges only what it committed). :meth:`Outbox.rewind` (a lost connection) and a restart
  make everything not acknowledged unsent again, to be sent again in order. Delivery is therefore
  **at least once**: a message whose PUBACK was lost arrives twice, with the same ``$.mid``.
- **bounds** (:class:`OutboxLimits`): at most ``max_messages`` messages and ``max_bytes`` bytes (body plus
  encoded properties), and at most ``max_message_bytes`` for one message (a larger one is refused at once
  with :class:`PayloadTooLarge`, as are properties the hub would refuse).
- **when full**: telemetry wants the newest readings, so room is made by deleting the **oldest unsent,
  non-critical** messages. Each one deleted counts as a drop; the count is kept in the database, and the
  message whose put caused drops carries the total so far as the property ``fleetward.dropped`` (a
  cumulative counter: the newest message is the last one a later drop would take, so the cloud sees the
  latest total). Messages sent and not yet acknowledged are never dropped, in flight or rewound by a lost
  connection (the hub may have them already, and a drop must be a loss), and messages put with
  ``critical=True`` never are: when no room can be made without dropping one of those, the put fails
  with :class:`OutboxFull` and nothing is dropped.
- **damage**: a database that is not SQLite, fails its ``quick_check``, or has an unknown schema is
  refused with :class:`OutboxCorrupt` and left untouched: the agent never deletes or re-creates a file
  that may hold messages a caller was told were stored. Move it aside to start a new outbox.

All database work runs on one thread of the outbox's own, in order; the event loop only waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from fleetward.agent import dialect
from fleetward.bounds import check_positive
from fleetward.errors import ConfigurationError, FleetwardError, PayloadTooLarge, TransportError

T = TypeVar("T")

#: 2: ``message_id`` without a unique index (ADR 0014); a version-1 outbox is rebuilt in place when opened
SCHEMA_VERSION = 2
DROPPED = "fleetward.dropped"
#: what the outbox adds to a message (``$.mid`` and ``fleetward.dropped``), at most, in bytes and pairs
_RESERVED_BYTES = 96
_RESERVED_PROPERTIES = 2

_SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    critical INTEGER NOT NULL
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('dropped', 0);
"""


class OutboxFull(TransportError):
    """No room for the message without dropping a critical or in-flight one; retry once the hub took some."""

    default_code = "outbox_full"


class OutboxCorrupt(FleetwardError):
    """The outbox database is damaged or not an outbox; it is left as it is (it may hold unsent messages)."""

    default_code = "outbox_corrupt"


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the outbox. The defaults suit a small device: 10,000 messages, 16 MiB on disk."""

    max_messages: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    #: one message, body plus encoded properties: the hub takes 256 KiB of telemetry in one packet
    max_message_bytes: int = 256 * 1024 - _RESERVED_BYTES
    #: puts in one transaction
    commit_batch_max: int = 512
    #: puts waiting for their commit before ``put`` waits for room (back-pressure)
    pending_max: int = 4096

    def __post_init__(self) -> None:
        check_positive(
            self,
            "outbox limit",
            only=("max_messages", "max_bytes", "max_message_bytes", "commit_batch_max", "pending_max"),
        )
        if self.max_message_bytes + _RESERVED_BYTES > self.max_bytes:
            raise ValueError("max_bytes must hold at least one message of max_message_bytes")


@dataclass(frozen=True)
class OutboxMessage:
    """A message handed out for sending. ``seq`` orders the outbox; ``message_id`` is its ``$.mid``."""

    seq: int
    message_id: str
    properties: dialect.Properties
    body: bytes
    critical: bool
    #: handed out before, since the outbox was opened (the MQTT DUP flag)
    redelivery: bool

    @property
    def encoded_properties(self) -> str:
        return dialect.encode_properties(self.properties)


@dataclass(frozen=True)
class OutboxStats:
    messages: int
    bytes: int
    in_flight: int
    dropped: int
    #: put transactions since the outbox was opened
    commits: int


@dataclass(frozen=True)
class _Draft:
    message_id: str
    properties: dialect.Properties
    body: bytes
    critical: bool
    #: body plus encoded properties, as the bounds count it
    size: int


def prepare(
    body: bytes,
    properties: Mapping[str, str] | Iterable[tuple[str, str]],
    critical: bool,
    limits: OutboxLimits,
    message_id: str,
) -> _Draft:
    """Check a message against the bounds; pure. The message id comes first among its properties."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"a message body is bytes, not {type(body).__name__}")
    pairs = (
        (dialect.MESSAGE_ID, message_id),
        *dialect.check_properties(properties, reserved=_RESERVED_PROPERTIES),
    )
    size = len(body) + len(dialect.encode_properties(pairs))
    if size > limits.max_message_bytes:
        raise PayloadTooLarge(
            f"a message is at most {limits.max_message_bytes} bytes with its properties, this one {size}",
            code="message_too_large",
        )
    return _Draft(message_id, pairs, bytes(body), bool(critical), size)


class _Database:
    """The synchronous side: one SQLite connection, used only from the outbox's thread."""

    def __init__(self, path: Path, limits: OutboxLimits) -> None:
        self.path = path
        self._limits = limits
        self._connection = _open(path)
        try:
            row = self._connection.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            self.count, self.bytes = int(row[0]), int(row[1])
            self.dropped = self._counter("dropped")
        except sqlite3.DatabaseError as error:
            self._connection.close()
            raise _translate(error, path) from None
        #: the highest seq handed out since the last rewind; messages up to it are in flight
        self.cursor = 0
        self._handed: set[int] = set()
        self.commits = 0

    def _counter(self, name: str) -> int:
        row = self._connection.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise OutboxCorrupt(f"{self.path}: the outbox lost its {name} counter")
        return int(row[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        cursor = self._connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                self._connection.rollback()
                raise
            cursor.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                self._connection.rollback()
            raise _translate(error, self.path) from None
        finally:
            cursor.close()

    def put(self, drafts: Sequence[_Draft]) -> tuple[list[str | FleetwardError], int]:
        """Store a batch in one transaction; per draft, its message id or why it was refused."""
        results: list[str | FleetwardError] = []
        count, size_total, dropped = self.count, self.bytes, self.dropped
        with self._transaction() as cursor:
            for draft in drafts:
                properties, size = draft.properties, draft.size
                if count + 1 > self._limits.max_messages or size_total + size > self._limits.max_bytes:
                    # Room for the message and for the drop count it will carry.
                    need_count = count + 1 - self._limits.max_messages
                    need_bytes = size_total + size + _RESERVED_BYTES - self._limits.max_bytes
                    victims = self._victims(cursor, need_count, need_bytes)
                    if victims is None:
                        results.append(
                            OutboxFull(
                                f"the outbox is full ({count} messages, {size_total} bytes) and holds "
                                "nothing it may drop to make room: only critical or in-flight messages"
                            )
                        )
                        continue
                    _delete(cursor, [seq for seq, _size in victims])
                    for seq, victim_size in victims:
                        self._handed.discard(seq)
                        count -= 1
                        size_total -= victim_size
                    dropped += len(victims)
                    properties = (*properties, (DROPPED, str(dropped)))
                    size = len(draft.body) + len(dialect.encode_properties(properties))
                cursor.execute(
                    "INSERT INTO messages (message_id, properties, body, size, critical) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (draft.message_id, json.dumps(properties), draft.body, size, int(draft.critical)),
                )
                count += 1
                size_total += size
                results.append(draft.message_id)
            if dropped != self.dropped:
                cursor.execute("UPDATE counters SET value = ? WHERE name = 'dropped'", (dropped,))
        self.count, self.bytes, self.dropped = count, size_total, dropped
        self.commits += 1
        return results, count

    def _victims(
        self, cursor: sqlite3.Cursor, need_count: int, need_bytes: int
    ) -> list[tuple[int, int]] | None:
        """The oldest unsent, non-critical messages that make enough room; None if they cannot."""
        victims: list[tuple[int, int]] = []
        freed_bytes = 0
        rows = cursor.execute(
            "SELECT seq, size FROM messages WHERE seq > ? AND critical = 0 ORDER BY seq", (self.cursor,)
        )
        for seq, size in rows:
            if seq in self._handed:  # sent since a lost connection rewound it: the hub may have it
                continue
            victims.append((int(seq), int(size)))
            freed_bytes += int(size)
            if len(victims) >= need_count and freed_bytes >= need_bytes:
                return victims
        return None

    def take(self, limit: int) -> list[OutboxMessage]:
        try:
            rows = self._connection.execute(
                "SELECT seq, message_id, properties, body, critical FROM messages WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (self.cursor, limit),
            ).fetchall()
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        taken: list[OutboxMessage] = []
        for seq, message_id, properties, body, critical in rows:
            try:
                pairs = tuple((str(key), str(value)) for key, value in json.loads(properties))
            except (ValueError, TypeError):
                raise OutboxCorrupt(f"{self.path}: message {seq} has unreadable properties") from None
            taken.append(
                OutboxMessage(seq, message_id, pairs, bytes(body), bool(critical), seq in self._handed)
            )
            self._handed.add(seq)
            self.cursor = seq
        return taken

    def acknowledge(self, seqs: Sequence[int]) -> int:
        with self._transaction() as cursor:
            deleted = _delete(cursor, seqs)
        self.count -= len(deleted)
        self.bytes -= sum(deleted)
        self._handed.difference_update(seqs)
        return self.count

    def stats(self) -> OutboxStats:
        try:
            (in_flight,) = self._connection.execute(
                "SELECT COUNT(*) FROM messages WHERE seq <= ?", (self.cursor,)
            ).fetchone()
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        return OutboxStats(self.count, self.bytes, int(in_flight), self.dropped, self.commits)

    def close(self) -> None:
        self._connection.close()


def _delete(cursor: sqlite3.Cursor, seqs: Sequence[int]) -> list[int]:
    """Delete messages by seq; the sizes of those that were there."""
    sizes: list[int] = []
    for start in range(0, len(seqs), 500):
        chunk = list(seqs[start : start + 500])
        marks = ", ".join("?" * len(chunk))
        rows = cursor.execute(f"DELETE FROM messages WHERE seq IN ({marks}) RETURNING size", chunk)  # noqa: S608
        sizes.extend(int(size) for (size,) in rows.fetchall())
    return sizes


def _translate(error: sqlite3.Error, path: Path) -> FleetwardError:
    if isinstance(error, sqlite3.OperationalError):
        return TransportError(f"{path}: the outbox could not be used: {error}", code="outbox_unavailable")
    if isinstance(error, sqlite3.DatabaseError):
        return OutboxCorrupt(
            f"{path} is damaged or not an outbox ({error}); it was left untouched: move it aside to start "
            "a new outbox, its messages are not lost"
        )
    return TransportError(f"{path}: {error}", code="outbox_unavailable")


def _open(path: Path) -> sqlite3.Connection:
    """Open (or create) the database, check it, and bring an empty one to the schema."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
    except sqlite3.Error as error:
        raise _translate(error, path) from None
    try:
        check = connection.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            problems = "; ".join(str(row[0]) for row in check[:3])
            raise OutboxCorrupt(
                f"{path} fails its integrity check ({problems}); it was left untouched: move it aside to "
                "start a new outbox"
            )
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version == 0:
            (tables,) = connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            if tables:
                raise OutboxCorrupt(f"{path} is a SQLite database, but not an outbox; it was left untouched")
        elif version == 1:
            _upgrade_from_1(connection)
        elif version != SCHEMA_VERSION:
            raise OutboxCorrupt(
                f"{path} has outbox schema {version}, this agent knows {SCHEMA_VERSION}",
                code="outbox_version",
            )
        connection.execute("PRAGMA journal_mode=WAL").fetchone()
        connection.execute("PRAGMA synchronous=FULL")
        if version == 0:
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            connection.execute("COMMIT")
    except sqlite3.Error as error:
        connection.close()
        raise _translate(error, path) from None
    except FleetwardError:
        connection.close()
        raise
    return connection


def _upgrade_from_1(connection: sqlite3.Connection) -> None:
    """Rebuild the messages table without the unique index on ``message_id``, keeping every message, its
    seq and the drop counter, in one transaction: a crash leaves version 1 whole, to be upgraded again."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            "CREATE TABLE messages_2 (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, "
            "properties TEXT NOT NULL, body BLOB NOT NULL, size INTEGER NOT NULL, critical INTEGER NOT NULL)"
        )
        connection.execute(
            "INSERT INTO messages_2 SELECT seq, message_id, properties, body, size, critical FROM messages"
        )
        connection.execute("DROP TABLE messages")
        connection.execute("ALTER TABLE messages_2 RENAME TO messages")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class Outbox:
    """The telemetry outbox of one agent. Open it with :meth:`open`; use it from one event loop."""

    def __init__(self, database: _Database, lock: int, limits: OutboxLimits) -> None:
        self._db = database
        self._lock = lock
        self._limits = limits
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetward-outbox")
        self._pending: list[tuple[_Draft, asyncio.Future[str]]] = []
        self._room: asyncio.Semaphore | None = None
        self._committer: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._empty: asyncio.Event | None = None
        self._count = database.count
        self._closed = False

    @classmethod
    def open(cls, directory: Path, limits: OutboxLimits | None = None, *, name: str = "outbox.db") -> Outbox:
        """Open the outbox in ``directory`` (made 0700 if missing), or refuse a damaged one."""
        limits = limits or OutboxLimits()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / name
        lock = os.open(directory / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ConfigurationError(f"{path} is in use by another agent", code="outbox_in_use") from None
        try:
            database = _Database(path, limits)
        except BaseException:
            os.close(lock)
            raise
        return cls(database, lock, limits)

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def limits(self) -> OutboxLimits:
        return self._limits

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self, work: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise TransportError("the outbox is closed", code="outbox_closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._ready is None or self._empty is None:
            self._ready, self._empty = asyncio.Event(), asyncio.Event()
            if self._count:
                self._ready.set()
            else:
                self._empty.set()
        return self._ready, self._empty

    # ------------------------------------------------------------------ putting

    async def put(
        self,
        body: bytes,
        properties: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        critical: bool = False,
    ) -> str:
        """Store a message; return its message id once it is on disk.

        Raises :class:`PayloadTooLarge` or :class:`InvalidInput` for a message the hub would refuse, and
        :class:`OutboxFull` when it finds no room (see the module's policy). A put cancelled while it
        waits for its commit may still be stored.
        """
        draft = prepare(body, properties, critical, self._limits, str(uuid.uuid4()))
        if self._closed:
            raise TransportError("the outbox is closed", code="outbox_closed")
        if self._room is None:
            self._room = asyncio.Semaphore(self._limits.pending_max)
        await self._room.acquire()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((draft, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending(), name="fleetward-outbox-commit")
        return await future

    async def _commit_pending(self) -> None:
        ready, empty = self._events()
        assert self._room is not None
        while self._pending:
            batch = self._pending[: self._limits.commit_batch_max]
            del self._pending[: len(batch)]
            results: list[str | FleetwardError] | list[Exception]
            try:
                results, count = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._db.put, [draft for draft, _ in batch]
                )
            except Exception as error:  # noqa: BLE001 - not swallowed: every caller of the batch gets it
                results, count = [error] * len(batch), self._count
            self._count = count
            for (_draft, future), result in zip(batch, results, strict=True):
                self._room.release()
                if future.done():
                    continue
                if isinstance(result, str):
                    future.set_result(result)
                else:
                    future.set_exception(result)
            if count:
                empty.clear()
                ready.set()

    # ------------------------------------------------------------------ sending

    async def take(self, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` of the oldest messages not handed out yet, now in flight; [] if there are none."""
        if limit <= 0:
            return []
        ready, _empty = self._events()
        ready.clear()  # before the read: a commit after it rings again
        return await self._run(self._db.take, limit)

    async def wait(self) -> None:
        """Wait until a put is committed after the last :meth:`take` that came back short."""
        ready, _empty = self._events()
        await ready.wait()

    async def acknowledge(self, seqs: Sequence[int]) -> None:
        """Delete messages the hub acknowledged, in one transaction."""
        if not seqs:
            return
        count = await self._run(self._db.acknowledge, list(seqs))
        self._count = count
        _ready, empty = self._events()
        if not count and not self._pending:
            empty.set()

    async def rewind(self) -> None:
        """Make every message in flight unsent again (the connection was lost before their PUBACK)."""

        def rewind() -> None:
            self._db.cursor = 0

        await self._run(rewind)
        ready, _empty = self._events()
        if self._count:
            ready.set()

    async def wait_empty(self) -> None:
        """Wait until every message put so far has been acknowledged."""
        _ready, empty = self._events()
        await empty.wait()

    async def stats(self) -> OutboxStats:
        return await self._run(self._db.stats)

    async def close(self) -> None:
        """Commit what is waiting, then close the database and release the lock. Idempotent."""
        if self._closed:
            return
        if self._committer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._committer)
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)
        os.close(self._lock)
