"""The migrations build exactly the schema the code declares, on both engines."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fleetward.store.database import Database, head_revision
from fleetward.store.schema import metadata


def test_the_migrations_build_the_declared_schema_with_nothing_missing_or_extra(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        assert database.current_revision() == head_revision()
        with database.read() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
    finally:
        database.dispose()
    assert differences == []
