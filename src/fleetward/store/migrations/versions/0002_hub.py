"""hub: telemetry, twins, cloud-to-device, trust changes

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "telemetry",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("properties", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry")),
    )
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_tenant_device_id", ["tenant_id", "device_id", "id"], unique=False)
        batch_op.create_index("ix_telemetry_tenant_received", ["tenant_id", "received_at"], unique=False)

    op.create_table(
        "trust_changes",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_trust_changes")),
    )
    op.create_table(
        "cloud_to_device",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("properties", sa.Text(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("expires_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("completed_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_cloud_to_device_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloud_to_device")),
    )
    with op.batch_alter_table("cloud_to_device", schema=None) as batch_op:
        batch_op.create_index(
            "ix_cloud_to_device_device_state", ["device_id", "state", "created_at"], unique=False
        )

    op.create_table(
        "twins",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("desired", sa.Text(), nullable=False),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("reported", sa.Text(), nullable=False),
        sa.Column("reported_version", sa.Integer(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_twins_device_id_devices")),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_twins")),
    )


def downgrade() -> None:

    op.drop_table("twins")
    with op.batch_alter_table("cloud_to_device", schema=None) as batch_op:
        batch_op.drop_index("ix_cloud_to_device_device_state")

    op.drop_table("cloud_to_device")
    op.drop_table("trust_changes")
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_tenant_received")
        batch_op.drop_index("ix_telemetry_tenant_device_id")

    op.drop_table("telemetry")
