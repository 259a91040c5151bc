"""The one schema of fleetward, for SQLite and PostgreSQL alike. Migrations build it (``migrations/``).

Every row that belongs to a tenant carries ``tenant_id``, and every query of the services filters on it.
Private keys live here only sealed (``sealed_key``: AES-256-GCM under the master key, see
``authority/keystore.py``); API tokens only as their SHA-256.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python, naive UTC in the database (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("fleetward stores only timezone-aware datetimes")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)


ID = 36  # a UUID in text form
DEVICE_ID = 64
MODULE_ID = 64  # a module id (hub/session.py)
NAME = 128

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

operators = Table(
    "operators",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("name", String(NAME), nullable=False),
    Column("can_create_tenants", Boolean, nullable=False, default=False),
    Column("created_at", UtcDateTime, nullable=False),
    # a TOTP secret (RFC 6238), sealed under the master key; MFA is on once a first code is confirmed
    Column("mfa_secret_sealed", LargeBinary, nullable=True),
    Column("mfa_enabled_at", UtcDateTime, nullable=True),
)

role_assignments = Table(
    "role_assignments",
    metadata,
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("operator_id", String(ID), ForeignKey("operators.id"), primary_key=True),
    Column("role", String(32), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("operator_id", String(ID), ForeignKey("operators.id"), nullable=False, index=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=True),
    Column("name", String(NAME), nullable=False),
    Column("scopes", String(NAME), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("revoked_at", UtcDateTime, nullable=True),
)

products = Table(
    "products",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("tenant_id", "name"),
)

device_groups = Table(
    "device_groups",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("product_id", String(ID), ForeignKey("products.id"), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("update_policy", String(32), nullable=False),
    Column("os_feed", String(32), nullable=False),
    Column("allow_crash_dumps", Boolean, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("product_id", "name"),
    Index("ix_device_groups_tenant_product", "tenant_id", "product_id"),
)

devices = Table(
    "devices",
    metadata,
    # The device id is global: a device is claimed into exactly one tenant, once.
    Column("id", String(DEVICE_ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("product_id", String(ID), ForeignKey("products.id"), nullable=True),
    Column("group_id", String(ID), ForeignKey("device_groups.id"), nullable=True),
    Column("status", String(16), nullable=False),
    Column("claimed_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    Column("last_attested_at", UtcDateTime, nullable=True),
    Index("ix_devices_tenant_group", "tenant_id", "group_id"),
)

reference_values = Table(
    "reference_values",
    metadata,
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("component", String(NAME), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("sha256", String(64), primary_key=True),
    Column("created_at", UtcDateTime, nullable=False),
)

security_floors = Table(
    "security_floors",
    metadata,
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("component", String(NAME), primary_key=True),
    Column("minimum_version", String(64), nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

certificate_authorities = Table(
    "certificate_authorities",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # root | issuing
    Column("certificate", LargeBinary, nullable=False),  # DER
    Column("sealed_key", LargeBinary, nullable=False),
    Column("not_after", UtcDateTime, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("crl_number", BigInteger, nullable=False, default=0),
    Column("crl", LargeBinary, nullable=True),  # DER, the latest one this CA signed
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_certificate_authorities_tenant_kind", "tenant_id", "kind"),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(40), primary_key=True),  # hex
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("issuer_id", String(ID), ForeignKey("certificate_authorities.id"), nullable=False),
    Column("public_key_sha256", String(64), nullable=False),
    Column("not_before", UtcDateTime, nullable=False),
    Column("not_after", UtcDateTime, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    ForeignKeyConstraint(["device_id"], ["devices.id"]),
    Index("ix_certificates_tenant_device", "tenant_id", "device_id"),
    Index("ix_certificates_issuer_revoked", "issuer_id", "revoked_at"),
)

consumed_nonces = Table(
    "consumed_nonces",
    metadata,
    Column("nonce_id", String(32), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False, index=True),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), nullable=True),
    Column("device_id", String(DEVICE_ID), nullable=True),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("code", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("actor", String(NAME), nullable=True),
    Column("detail", Text, nullable=False),
    # The audit log: each event is an entry of its chain (its tenant's, "" for no tenant), hash-chained to
    # the one before it (migration 0006; rows written before it have no chain position).
    Column("chain", String(ID), nullable=True),
    Column("chain_seq", BigInteger, nullable=True),
    Column("prev_hash", String(64), nullable=True),
    Column("hash", String(64), nullable=True),
    Index("ix_events_tenant_at", "tenant_id", "at"),
    Index("ix_events_device_at", "device_id", "at"),
    UniqueConstraint("chain", "chain_seq"),
)

audit_heads = Table(
    "audit_heads",
    metadata,
    # The newest entry of each audit chain: appending locks this row, so entries get gap-free positions.
    Column("chain", String(ID), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)


# ---------------------------------------------------------------------- hub (migration 0002)

trust_changes = Table(
    "trust_changes",
    metadata,
    # An append-only feed: every hub process follows it to end the sessions trust no longer covers.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("serial", String(40), nullable=True),
    Column("kind", String(32), nullable=False),
    Column("at", UtcDateTime, nullable=False),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("properties", Text, nullable=False),  # JSON list of [key, value] pairs, in order
    Column("body", LargeBinary, nullable=False),
    Column("module_id", String(MODULE_ID), nullable=True),  # the module that sent it; None: the device
    Index("ix_telemetry_tenant_device_id", "tenant_id", "device_id", "id"),
    Index("ix_telemetry_tenant_received", "tenant_id", "received_at"),
)

twins = Table(
    "twins",
    metadata,
    Column("device_id", String(DEVICE_ID), ForeignKey("devices.id"), primary_key=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("desired", Text, nullable=False),
    Column("desired_version", Integer, nullable=False),
    Column("reported", Text, nullable=False),
    Column("reported_version", Integer, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

module_twins = Table(
    "module_twins",
    metadata,
    # The twin of each module of a device (a module session, IoT Hub's module identity): same halves.
    Column("device_id", String(DEVICE_ID), ForeignKey("devices.id"), primary_key=True),
    Column("module_id", String(MODULE_ID), primary_key=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("desired", Text, nullable=False),
    Column("desired_version", Integer, nullable=False),
    Column("reported", Text, nullable=False),
    Column("reported_version", Integer, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

cloud_to_device = Table(
    "cloud_to_device",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), ForeignKey("devices.id"), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("properties", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),  # pending | completed | expired
    Column("delivery_count", Integer, nullable=False),
    Column("completed_at", UtcDateTime, nullable=True),
    Index("ix_cloud_to_device_device_state", "device_id", "state", "created_at"),
)


# ---------------------------------------------------------------------- device reports (migration 0003)

device_reports = Table(
    "device_reports",
    metadata,
    # What devices report about themselves: application failures (grouped by signature) and baselines.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("component_id", String(36), nullable=True),
    Column("signature", String(64), nullable=True),
    Column("headline", String(200), nullable=False),
    Column("occurred_at", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("body", Text, nullable=False),  # the validated report, JSON
    Index("ix_device_reports_tenant_device_id", "tenant_id", "device_id", "id"),
    Index("ix_device_reports_tenant_signature", "tenant_id", "signature"),
    Index("ix_device_reports_tenant_received", "tenant_id", "received_at"),
)


# ---------------------------------------------------------------------- updates (migration 0005)

tuf_keys = Table(
    "tuf_keys",
    metadata,
    # The online keys of each tenant's image repository and director (sealed like the CA keys), and the
    # public half of the offline root keys (no private part: it never reaches the server).
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("keyid", String(64), primary_key=True),
    Column("role", String(NAME), nullable=False),  # root, targets, snapshot, timestamp, director, a product
    Column("public_key", Text, nullable=False),  # the TUF key as JSON
    Column("sealed_key", LargeBinary, nullable=True),  # None for an offline key
    Column("active", Boolean, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_tuf_keys_tenant_role", "tenant_id", "role"),
)

tuf_metadata = Table(
    "tuf_metadata",
    metadata,
    # Every version of every role of a tenant's image repository, as served (signed JSON bytes).
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("role", String(NAME), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

images = Table(
    "images",
    metadata,
    # A published image: an application's (or the agent's) signed package, a target of the repository.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("product_id", String(ID), ForeignKey("products.id"), nullable=False),
    Column("component_id", String(36), nullable=False),
    Column("kind", String(16), nullable=False),  # app | agent
    Column("version", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("target_path", String(512), nullable=False),
    Column("publisher_signature", LargeBinary, nullable=False),
    Column("manifest", Text, nullable=False),  # the application's manifest, JSON
    Column("created_by", String(NAME), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("tenant_id", "product_id", "component_id", "version"),
)

image_blobs = Table(
    "image_blobs",
    metadata,
    # The bytes of images and of deltas between them, by content.
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("sha256", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

image_deltas = Table(
    "image_deltas",
    metadata,
    # A bsdiff delta from one image to the next version of the same component.
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("base_sha256", String(64), primary_key=True),
    Column("target_sha256", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("target_path", String(512), nullable=False),
)

deployments = Table(
    "deployments",
    metadata,
    # What a device group must run: a set of images, one current deployment per group at a time.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("group_id", String(ID), ForeignKey("device_groups.id"), nullable=False),
    Column("image_ids", Text, nullable=False),  # JSON list
    Column("previous_id", String(ID), nullable=True),  # the deployment it replaced (what a revert restores)
    Column("state", String(16), nullable=False),  # rolling_out | current | superseded | aborted | reverted
    Column("rollout", Text, nullable=False),  # the rollout plan and its progress, JSON
    Column("reason", Text, nullable=False, default=""),
    Column("created_by", String(NAME), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_deployments_tenant_group", "tenant_id", "group_id", "created_at"),
)

device_updates = Table(
    "device_updates",
    metadata,
    # Where each device is with the deployment it was assigned: its wave, state, and why.
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), ForeignKey("devices.id"), primary_key=True),
    Column("deployment_id", String(ID), ForeignKey("deployments.id"), nullable=True),
    Column("wave", Integer, nullable=True),
    Column("assignment_version", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # assigned | downloading | trial | installed | …
    Column("code", String(64), nullable=True),
    Column("message", Text, nullable=False, default=""),
    Column("bytes_downloaded", BigInteger, nullable=False, default=0),
    Column("bytes_saved", BigInteger, nullable=False, default=0),
    Column("components", Text, nullable=False, default="[]"),  # what it reported running, JSON
    Column("assigned_at", UtcDateTime, nullable=True),
    Column("reported_at", UtcDateTime, nullable=True),
    # when it last reached ``installed`` (migration 0006): a release policy wants an attestation after it
    Column("installed_at", UtcDateTime, nullable=True),
    Index("ix_device_updates_tenant_deployment", "tenant_id", "deployment_id", "state"),
)


# ---------------------------------------------------------------------- monitor (migration 0006)

alerts = Table(
    "alerts",
    metadata,
    # What a detector found on a device, with its evidence; an open alert counts its repeats.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("group_id", String(ID), nullable=True),
    Column("detector", String(NAME), nullable=False),
    Column("code", String(64), nullable=False),
    Column("severity", String(16), nullable=False),  # low | medium | high | critical
    Column("score", Float, nullable=False),
    Column("summary", Text, nullable=False),
    Column("evidence", Text, nullable=False),  # JSON list
    Column("state", String(16), nullable=False),  # open | acknowledged | closed
    Column("count", Integer, nullable=False),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=False),
    Column("closed_at", UtcDateTime, nullable=True),
    Column("closed_by", String(NAME), nullable=True),
    Index("ix_alerts_tenant_state_opened", "tenant_id", "state", "opened_at"),
    Index("ix_alerts_tenant_device_state", "tenant_id", "device_id", "state"),
)

device_health = Table(
    "device_health",
    metadata,
    # Each device's current health and why; conditional access reads it.
    Column("device_id", String(DEVICE_ID), ForeignKey("devices.id"), primary_key=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("state", String(16), nullable=False),  # healthy | at_risk | unhealthy | quarantined
    Column("risk", Integer, nullable=False),  # 0..100
    Column("reasons", Text, nullable=False),  # JSON list
    # conditional access: narrowed hub topics and remediation-only certificates
    Column("restricted", Boolean, nullable=False),
    Column("computed_at", UtcDateTime, nullable=False),
    Column("changed_at", UtcDateTime, nullable=False),
    Index("ix_device_health_tenant_state", "tenant_id", "state"),
)

device_health_history = Table(
    "device_health_history",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant_id", String(ID), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("risk", Integer, nullable=False),
    Column("reasons", Text, nullable=False),
    Index("ix_device_health_history_tenant_device_at", "tenant_id", "device_id", "at"),
)

detection_rules = Table(
    "detection_rules",
    metadata,
    # A tenant's own detection rules (JSON), used instead of the shipped defaults when present.
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("rules", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

detector_state = Table(
    "detector_state",
    metadata,
    # What the statistical baselines learned of a device, kept across restarts.
    Column("tenant_id", String(ID), primary_key=True),
    Column("device_id", String(DEVICE_ID), primary_key=True),
    Column("state", LargeBinary, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

notice_destinations = Table(
    "notice_destinations",
    metadata,
    # Where playbooks send alerts: webhooks (their signing secret is derived from the master key, never
    # stored) and syslog/CEF collectors.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("kind", String(16), nullable=False),  # webhook | syslog
    Column("target", String(1024), nullable=False),  # the URL, or syslog host:port
    Column("options", Text, nullable=False),  # JSON: syslog transport, …
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("tenant_id", "name"),
)

playbooks = Table(
    "playbooks",
    metadata,
    # Condition → actions, automatic or awaiting an operator's approval.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("name", String(NAME), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("approval", String(16), nullable=False),  # automatic | operator
    Column("condition", Text, nullable=False),  # JSON
    Column("actions", Text, nullable=False),  # JSON list
    Column("created_by", String(NAME), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    UniqueConstraint("tenant_id", "name"),
)

playbook_runs = Table(
    "playbook_runs",
    metadata,
    # One playbook applied to one device: its actions, what each did, and how to undo it.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("playbook_id", String(ID), ForeignKey("playbooks.id"), nullable=False),
    Column("device_id", String(DEVICE_ID), nullable=False),
    Column("alert_id", BigInteger, nullable=True),
    Column("state", String(24), nullable=False),  # awaiting_approval | done | failed | refused | undone
    Column("actions", Text, nullable=False),  # JSON list: each action, its outcome and its undo data
    Column("created_at", UtcDateTime, nullable=False),
    Column("decided_by", String(NAME), nullable=True),
    Column("decided_at", UtcDateTime, nullable=True),
    Column("undone_by", String(NAME), nullable=True),
    Column("undone_at", UtcDateTime, nullable=True),
    Column("detail", Text, nullable=False, default=""),
    Index("ix_playbook_runs_tenant_state", "tenant_id", "state"),
    Index("ix_playbook_runs_tenant_device", "tenant_id", "device_id"),
)

audit_runs = Table(
    "audit_runs",
    metadata,
    # One run of the audit checks over a tenant, on a schedule or on demand.
    Column("id", String(ID), primary_key=True),
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), nullable=False),
    Column("trigger", String(16), nullable=False),  # schedule | on_demand
    Column("checks", Text, nullable=False),  # JSON list of the checks run
    Column("state", String(16), nullable=False),  # running | finished | failed
    Column("findings", Integer, nullable=False),
    Column("started_by", String(NAME), nullable=True),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=True),
    Index("ix_audit_runs_tenant_started", "tenant_id", "started_at"),
)

audit_findings = Table(
    "audit_findings",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(ID), ForeignKey("audit_runs.id"), nullable=False),
    Column("tenant_id", String(ID), nullable=False),
    Column("check", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("subject_kind", String(32), nullable=False),  # device | certificate | ca | operator | component
    Column("subject_id", String(NAME), nullable=False),
    Column("detail", Text, nullable=False),
    Column("found_at", UtcDateTime, nullable=False),
    Index("ix_audit_findings_tenant_run", "tenant_id", "run_id"),
)

audit_schedules = Table(
    "audit_schedules",
    metadata,
    # When each tenant's audit runs next, and which checks it runs.
    Column("tenant_id", String(ID), ForeignKey("tenants.id"), primary_key=True),
    Column("interval_seconds", Integer, nullable=False),
    Column("checks", Text, nullable=False),  # JSON list; empty: all of them
    Column("next_run_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
