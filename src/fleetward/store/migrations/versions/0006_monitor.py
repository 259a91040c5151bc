"""monitor: alerts, health, detection, playbooks, audits, audit log chain

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fleetward.store.schema

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_heads",
        sa.Column("chain", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("chain", name=op.f("pk_audit_heads")),
    )
    op.create_table(
        "detector_state",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "device_id", name=op.f("pk_detector_state")),
    )
    op.create_table(
        "device_health_history",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("risk", sa.Integer(), nullable=False),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_health_history")),
    )
    with op.batch_alter_table("device_health_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_health_history_tenant_device_at", ["tenant_id", "device_id", "at"], unique=False
        )

    op.create_table(
        "alerts",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("group_id", sa.String(length=36), nullable=True),
        sa.Column("detector", sa.String(length=128), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("opened_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("last_seen_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("closed_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("closed_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_alerts_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_alerts_tenant_device_state", ["tenant_id", "device_id", "state"], unique=False
        )
        batch_op.create_index(
            "ix_alerts_tenant_state_opened", ["tenant_id", "state", "opened_at"], unique=False
        )

    op.create_table(
        "audit_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("checks", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("findings", sa.Integer(), nullable=False),
        sa.Column("started_by", sa.String(length=128), nullable=True),
        sa.Column("started_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("finished_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_audit_runs_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_runs")),
    )
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.create_index("ix_audit_runs_tenant_started", ["tenant_id", "started_at"], unique=False)

    op.create_table(
        "audit_schedules",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=False),
        sa.Column("checks", sa.Text(), nullable=False),
        sa.Column("next_run_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_audit_schedules_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_audit_schedules")),
    )
    op.create_table(
        "detection_rules",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("rules", sa.Text(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_detection_rules_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_detection_rules")),
    )
    op.create_table(
        "notice_destinations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=1024), nullable=False),
        sa.Column("options", sa.Text(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_notice_destinations_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notice_destinations")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_notice_destinations_tenant_id_name")),
    )
    op.create_table(
        "playbooks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("approval", sa.String(length=16), nullable=False),
        sa.Column("condition", sa.Text(), nullable=False),
        sa.Column("actions", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("updated_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_playbooks_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_playbooks")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_playbooks_tenant_id_name")),
    )
    op.create_table(
        "audit_findings",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("check", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("subject_kind", sa.String(length=32), nullable=False),
        sa.Column("subject_id", sa.String(length=128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("found_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["audit_runs.id"], name=op.f("fk_audit_findings_run_id_audit_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_findings")),
    )
    with op.batch_alter_table("audit_findings", schema=None) as batch_op:
        batch_op.create_index("ix_audit_findings_tenant_run", ["tenant_id", "run_id"], unique=False)

    op.create_table(
        "playbook_runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("playbook_id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("actions", sa.Text(), nullable=False),
        sa.Column("created_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.Column("decided_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("undone_by", sa.String(length=128), nullable=True),
        sa.Column("undone_at", fleetward.store.schema.UtcDateTime(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["playbook_id"], ["playbooks.id"], name=op.f("fk_playbook_runs_playbook_id_playbooks")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_playbook_runs_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_playbook_runs")),
    )
    with op.batch_alter_table("playbook_runs", schema=None) as batch_op:
        batch_op.create_index("ix_playbook_runs_tenant_device", ["tenant_id", "device_id"], unique=False)
        batch_op.create_index("ix_playbook_runs_tenant_state", ["tenant_id", "state"], unique=False)

    op.create_table(
        "device_health",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("risk", sa.Integer(), nullable=False),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("restricted", sa.Boolean(), nullable=False),
        sa.Column("computed_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.Column("changed_at", fleetward.store.schema.UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_health_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_health")),
    )
    with op.batch_alter_table("device_health", schema=None) as batch_op:
        batch_op.create_index("ix_device_health_tenant_state", ["tenant_id", "state"], unique=False)

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chain", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("chain_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_events_chain_chain_seq"), ["chain", "chain_seq"])

    with op.batch_alter_table("device_updates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("installed_at", fleetward.store.schema.UtcDateTime(), nullable=True))

    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mfa_secret_sealed", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("mfa_enabled_at", fleetward.store.schema.UtcDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.drop_column("mfa_enabled_at")
        batch_op.drop_column("mfa_secret_sealed")

    with op.batch_alter_table("device_updates", schema=None) as batch_op:
        batch_op.drop_column("installed_at")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_events_chain_chain_seq"), type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("chain_seq")
        batch_op.drop_column("chain")

    with op.batch_alter_table("device_health", schema=None) as batch_op:
        batch_op.drop_index("ix_device_health_tenant_state")

    op.drop_table("device_health")
    with op.batch_alter_table("playbook_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_playbook_runs_tenant_state")
        batch_op.drop_index("ix_playbook_runs_tenant_device")

    op.drop_table("playbook_runs")
    with op.batch_alter_table("audit_findings", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_findings_tenant_run")

    op.drop_table("audit_findings")
    op.drop_table("playbooks")
    op.drop_table("notice_destinations")
    op.drop_table("detection_rules")
    op.drop_table("audit_schedules")
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_runs_tenant_started")

    op.drop_table("audit_runs")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_tenant_state_opened")
        batch_op.drop_index("ix_alerts_tenant_device_state")

    op.drop_table("alerts")
    with op.batch_alter_table("device_health_history", schema=None) as batch_op:
        batch_op.drop_index("ix_device_health_history_tenant_device_at")

    op.drop_table("device_health_history")
    op.drop_table("detector_state")
    op.drop_table("audit_heads")
