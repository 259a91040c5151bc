"""The store's shell: engines for SQLite (the embedded default) and PostgreSQL, transactions, migrations.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk before it is acknowledged. Write
transactions start with ``BEGIN IMMEDIATE`` so that two writers queue on the lock instead of failing when a
read transaction upgrades; reads use a separate engine and never block writers.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from fleetward.errors import ConfigurationError, Conflict, TransportError

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x666C656574  # "fleet": the advisory lock key that serializes migrations on PostgreSQL


def head_revision() -> str:
    """The newest migration shipped with this version of fleetward."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def _sqlite_engine(url: sa.URL, *, immediate: bool) -> Engine:
    database = url.database or ""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=1 if immediate else 8,
        max_overflow=0 if immediate else 8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, open transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Both engines of one store, and the transactions fleetward runs on them."""

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigurationError(f"not a database URL: {url!r}") from None
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        self._lock_file: int | None = None
        self._lock_guard = threading.Lock()
        if self.dialect == "sqlite":
            self._writer = _sqlite_engine(parsed, immediate=True)
            self._reader = _sqlite_engine(parsed, immediate=False)
            if parsed.database and parsed.database != ":memory:":
                self._lock_file = os.open(f"{parsed.database}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
        elif self.dialect == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            self._writer = sa.create_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True)
            self._reader = self._writer
        else:
            raise ConfigurationError(
                f"fleetward stores its data in SQLite or PostgreSQL, not {self.dialect!r}"
            )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._writer_turn(), _translated(), self._writer.begin() as connection:
            yield connection

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """On a SQLite file, wait for the other processes' writers on a lock the kernel hands over.

        SQLite's own busy handler polls with sleeps of up to 100 ms; with several worker processes that
        turns every lock conflict into latency. An exclusive ``flock`` wakes the next writer at once.
        """
        if self._lock_file is None:
            yield
            return
        with self._lock_guard:  # one thread of this process at a time holds the file lock
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot."""
        with _translated(), self._reader.begin() as connection:
            yield connection

    def insert_or_ignore(self, table: sa.Table) -> Any:
        """``INSERT ... ON CONFLICT DO NOTHING`` for this dialect."""
        if self.is_sqlite:
            return sqlite.insert(table).on_conflict_do_nothing()
        return postgresql.insert(table).on_conflict_do_nothing()

    def stored_time(self, moment: dt.datetime) -> object:
        """A timestamp as this dialect stores it (what ``schema.UtcDateTime`` writes), for ``insert_rows``."""
        utc = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return utc.strftime("%Y-%m-%d %H:%M:%S.%f") if self.is_sqlite else utc

    def insert_rows(
        self,
        connection: Connection,
        table: sa.Table,
        columns: tuple[str, ...],
        rows: list[tuple[object, ...]],
    ) -> None:
        """Insert rows of plain values through the driver's ``executemany``: the telemetry hot path, where
        SQLAlchemy's per-row parameter processing would cost more than the insert. Values must already be
        in stored form (``stored_time`` for timestamps)."""
        unknown = set(columns) - set(table.columns.keys())
        if unknown:
            raise ValueError(f"{table.name} has no columns {sorted(unknown)}")
        marker = "?" if self.is_sqlite else "%s"
        placeholders = ", ".join([marker] * len(columns))
        # Names come from the schema (checked above), values go as parameters: nothing is interpolated.
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608
        connection.exec_driver_sql(sql, rows)

    def upgrade(self) -> None:
        """Bring the schema to the newest migration."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with _translated(), self._writer_turn(), self._writer.begin() as connection:
            if not self.is_sqlite:  # nodes starting together migrate one after the other
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def current_revision(self) -> str | None:
        with self.read() as connection:
            inspector = sa.inspect(connection)
            if not inspector.has_table("alembic_version"):
                return None
            row = connection.execute(sa.text("SELECT version_num FROM alembic_version")).first()
            return None if row is None else str(row[0])

    def dispose(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        self._writer.dispose()
        if self._reader is not self._writer:
            self._reader.dispose()


@contextmanager
def _translated() -> Iterator[None]:
    """Keep SQLAlchemy's exceptions inside the store."""
    try:
        yield
    except IntegrityError as error:
        raise Conflict("the change conflicts with data already stored", code="store_conflict") from error
    except OperationalError as error:
        raise TransportError(
            f"the database is unavailable ({type(error.orig).__name__})", code="store_unavailable"
        ) from error
    except DBAPIError as error:
        raise TransportError(
            f"the database failed ({type(error.orig).__name__})", code="store_failed"
        ) from error
