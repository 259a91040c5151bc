"""modules: telemetry names the module that sent it; module twins

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("module_id", sa.String(length=64), nullable=True))
    op.create_table(
        "module_twins",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("module_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("desired", sa.Text(), nullable=False),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("reported", sa.Text(), nullable=False),
        sa.Column("reported_version", sa.Integer(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_module_twins_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "module_id", name=op.f("pk_module_twins")),
    )


def downgrade() -> None:
    op.drop_table("module_twins")
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_column("module_id")
