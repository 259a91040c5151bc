"""updates: image repository, images, deployments, device updates

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_blobs",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_image_blobs_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "sha256", name=op.f("pk_image_blobs")),
    )
    op.create_table(
        "image_deltas",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_sha256", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("target_path", sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_image_deltas_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "base_sha256", "target_sha256", name=op.f("pk_image_deltas")),
    )
    op.create_table(
        "tuf_keys",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("keyid", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_tuf_keys_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "keyid", name=op.f("pk_tuf_keys")),
    )
    with op.batch_alter_table("tuf_keys", schema=None) as batch_op:
        batch_op.create_index("ix_tuf_keys_tenant_role", ["tenant_id", "role"], unique=False)

    op.create_table(
        "tuf_metadata",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("role", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tuf_metadata_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "role", "version", name=op.f("pk_tuf_metadata")),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("product_id", sa.String(length=36), nullable=False),
        sa.Column("component_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("target_path", sa.String(length=512), nullable=False),
        sa.Column("publisher_signature", sa.LargeBinary(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name=op.f("fk_images_product_id_products")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_images_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint(
            "tenant_id",
            "product_id",
            "component_id",
            "version",
            name=op.f("uq_images_tenant_id_product_id_component_id_version"),
        ),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("group_id", sa.String(length=36), nullable=False),
        sa.Column("image_ids", sa.Text(), nullable=False),
        sa.Column("previous_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("rollout", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["device_groups.id"], name=op.f("fk_deployments_group_id_device_groups")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_deployments_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deployments_tenant_group", ["tenant_id", "group_id", "created_at"], unique=False
        )

    op.create_table(
        "device_updates",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("deployment_id", sa.String(length=36), nullable=True),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("assignment_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("bytes_downloaded", sa.BigInteger(), nullable=False),
        sa.Column("bytes_saved", sa.BigInteger(), nullable=False),
        sa.Column("components", sa.Text(), nullable=False),
        sa.Column("assigned_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("reported_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["deployment_id"], ["deployments.id"], name=op.f("fk_device_updates_deployment_id_deployments")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_updates_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_updates")),
    )
    with op.batch_alter_table("device_updates", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_updates_tenant_deployment", ["tenant_id", "deployment_id", "state"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("device_updates", schema=None) as batch_op:
        batch_op.drop_index("ix_device_updates_tenant_deployment")

    op.drop_table("device_updates")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index("ix_deployments_tenant_group")

    op.drop_table("deployments")
    op.drop_table("images")
    op.drop_table("tuf_metadata")
    with op.batch_alter_table("tuf_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_tuf_keys_tenant_role")

    op.drop_table("tuf_keys")
    op.drop_table("image_deltas")
    op.drop_table("image_blobs")
