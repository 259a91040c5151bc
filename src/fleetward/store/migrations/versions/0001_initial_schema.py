"""initial schema

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "consumed_nonces",
        sa.Column("nonce_id", sa.String(length=32), nullable=False),
        sa.Column("expires_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("nonce_id", name=op.f("pk_consumed_nonces")),
    )
    with op.batch_alter_table("consumed_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consumed_nonces_expires_at"), ["expires_at"], unique=False)

    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=True),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_device_at", ["device_id", "at"], unique=False)
        batch_op.create_index("ix_events_tenant_at", ["tenant_id", "at"], unique=False)

    op.create_table(
        "operators",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("can_create_tenants", sa.Boolean(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operators")),
        sa.UniqueConstraint("email", name=op.f("uq_operators_email")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("operator_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("scopes", sa.String(length=128), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("expires_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("revoked_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["operator_id"], ["operators.id"], name=op.f("fk_api_tokens_operator_id_operators")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_api_tokens_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_operator_id"), ["operator_id"], unique=False)

    op.create_table(
        "certificate_authorities",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("not_after", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("crl", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_certificate_authorities_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificate_authorities")),
    )
    with op.batch_alter_table("certificate_authorities", schema=None) as batch_op:
        batch_op.create_index("ix_certificate_authorities_tenant_kind", ["tenant_id", "kind"], unique=False)

    op.create_table(
        "products",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_products_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_products_tenant_id_name")),
    )
    op.create_table(
        "reference_values",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("component", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_reference_values_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "component", "version", "sha256", name=op.f("pk_reference_values")
        ),
    )
    op.create_table(
        "role_assignments",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("operator_id", sa.String(length=36), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["operator_id"],
            ["operators.id"],
            name=op.f("fk_role_assignments_operator_id_operators"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_role_assignments_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "operator_id", name=op.f("pk_role_assignments")),
    )
    op.create_table(
        "security_floors",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("component", sa.String(length=128), nullable=False),
        sa.Column("minimum_version", sa.String(length=64), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_security_floors_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "component", name=op.f("pk_security_floors")),
    )
    op.create_table(
        "device_groups",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("product_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("update_policy", sa.String(length=32), nullable=False),
        sa.Column("os_feed", sa.String(length=32), nullable=False),
        sa.Column("allow_crash_dumps", sa.Boolean(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name=op.f("fk_device_groups_product_id_products")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_device_groups_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_groups")),
        sa.UniqueConstraint("product_id", "name", name=op.f("uq_device_groups_product_id_name")),
    )
    with op.batch_alter_table("device_groups", schema=None) as batch_op:
        batch_op.create_index("ix_device_groups_tenant_product", ["tenant_id", "product_id"], unique=False)

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("product_id", sa.String(length=36), nullable=True),
        sa.Column("group_id", sa.String(length=36), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("last_attested_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["group_id"], ["device_groups.id"], name=op.f("fk_devices_group_id_device_groups")
        ),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name=op.f("fk_devices_product_id_products")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_devices_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("ix_devices_tenant_group", ["tenant_id", "group_id"], unique=False)

    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_id", sa.String(length=36), nullable=False),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("not_before", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("not_after", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("revoked_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_certificates_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["issuer_id"],
            ["certificate_authorities.id"],
            name=op.f("fk_certificates_issuer_id_certificate_authorities"),
        ),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_certificates")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index("ix_certificates_issuer_revoked", ["issuer_id", "revoked_at"], unique=False)
        batch_op.create_index("ix_certificates_tenant_device", ["tenant_id", "device_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_tenant_device")
        batch_op.drop_index("ix_certificates_issuer_revoked")

    op.drop_table("certificates")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("ix_devices_tenant_group")

    op.drop_table("devices")
    with op.batch_alter_table("device_groups", schema=None) as batch_op:
        batch_op.drop_index("ix_device_groups_tenant_product")

    op.drop_table("device_groups")
    op.drop_table("security_floors")
    op.drop_table("role_assignments")
    op.drop_table("reference_values")
    op.drop_table("products")
    with op.batch_alter_table("certificate_authorities", schema=None) as batch_op:
        batch_op.drop_index("ix_certificate_authorities_tenant_kind")

    op.drop_table("certificate_authorities")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_operator_id"))

    op.drop_table("api_tokens")
    op.drop_table("tenants")
    op.drop_table("operators")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_tenant_at")
        batch_op.drop_index("ix_events_device_at")

    op.drop_table("events")
    with op.batch_alter_table("consumed_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consumed_nonces_expires_at"))

    op.drop_table("consumed_nonces")
