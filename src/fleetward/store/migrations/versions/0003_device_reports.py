"""device reports: application failures and security baselines

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "device_reports",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("component_id", sa.String(length=36), nullable=True),
        sa.Column("signature", sa.String(length=64), nullable=True),
        sa.Column("headline", sa.String(length=200), nullable=False),
        sa.Column("occurred_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("received_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_reports")),
    )
    with op.batch_alter_table("device_reports", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_reports_tenant_device_id", ["tenant_id", "device_id", "id"], unique=False
        )
        batch_op.create_index("ix_device_reports_tenant_signature", ["tenant_id", "signature"], unique=False)
        batch_op.create_index("ix_device_reports_tenant_received", ["tenant_id", "received_at"], unique=False)


def downgrade() -> None:
    op.drop_table("device_reports")
