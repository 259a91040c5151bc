"""API schemas, one per direction: what a caller sends (``…Create``, ``…Update``) and what it gets back."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetward.authority.service import CaKind, RevocationReason
from fleetward.monitor.reports import ReportKind
from fleetward.registry.mfa import MfaStatus
from fleetward.registry.models import ClaimOutcome, DeviceStatus, OsFeed, Role, UpdatePolicy
from fleetward.store.audit_chain import Problem
from fleetward.store.events import Severity
from fleetward.wire.baseline import SecurityBaseline
from fleetward.wire.identity import Sha256Hex

Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Description = Annotated[str, StringConstraints(max_length=4096)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class ErrorBody(BaseModel):
    code: str = Field(description="stable, machine-readable reason")
    message: str = Field(description="what was wrong, for a person")


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------ operators and tokens


class OperatorCreate(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=254)]
    name: Name
    can_create_tenants: bool = False


class OperatorPublic(Public):
    id: str
    email: str
    name: str
    can_create_tenants: bool
    created_at: dt.datetime
    mfa_enabled: bool = Field(description="a TOTP second factor is on")


class OperatorCreated(BaseModel):
    operator: OperatorPublic
    token: str = Field(description="a first API token for the new operator; shown once")


class Me(BaseModel):
    operator_id: str
    email: str
    token_id: str
    token_tenant_id: str | None
    scopes: list[str]
    roles: dict[str, Role]
    can_create_tenants: bool
    mfa_enabled: bool = Field(description="a TOTP second factor is on for this operator")


#: a TOTP code as an authenticator app shows it (6 digits, perhaps split by a space)
MfaCodeText = Annotated[str, StringConstraints(min_length=1, max_length=16)]


class TokenCreate(Strict):
    name: Name
    tenant_id: str | None = Field(default=None, description="restrict the token to one tenant")
    scopes: list[str] = Field(min_length=1, max_length=4, examples=[["read", "write"]])
    valid_days: int | None = Field(default=None, ge=1, le=3650)
    mfa_code: MfaCodeText | None = Field(
        default=None, description="a current TOTP code: required when the caller's MFA is on"
    )


class TokenPublic(Public):
    id: str
    name: str
    tenant_id: str | None
    scopes: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(BaseModel):
    token: TokenPublic
    secret: str = Field(description="the bearer token; shown once, stored only as its hash")


class MfaCode(Strict):
    code: MfaCodeText = Field(description="a current TOTP code", examples=["123456"])


class MfaStatusPublic(BaseModel):
    status: MfaStatus = Field(description="off; pending (enrolled, awaiting a first code); on")


class MfaEnrolled(BaseModel):
    status: MfaStatus
    secret: str = Field(description="the TOTP secret in base32, for an authenticator app; shown once")
    otpauth_uri: str = Field(description="the same secret as an otpauth:// URI (a QR code's content)")


# ------------------------------------------------------------------ tenants and roles


class TenantCreate(Strict):
    name: Name


class TenantPublic(Public):
    id: str
    name: str
    created_at: dt.datetime


class RoleAssign(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=254)]
    role: Role


class RolePublic(Public):
    tenant_id: str
    operator_id: str
    email: str
    role: Role
    created_at: dt.datetime


# ------------------------------------------------------------------ products, groups, devices


class ProductCreate(Strict):
    name: Name
    description: Description = ""


class ProductUpdate(Strict):
    description: Description


class ProductPublic(Public):
    id: str
    tenant_id: str
    name: str
    description: str
    created_at: dt.datetime


class DeviceGroupCreate(Strict):
    product: Name = Field(description="the product's id or name")
    name: Name
    description: Description = ""
    update_policy: UpdatePolicy = UpdatePolicy.UPDATE_ALL
    os_feed: OsFeed = OsFeed.RETAIL
    allow_crash_dumps: bool = False


class DeviceGroupUpdate(Strict):
    name: Name | None = None
    description: Description | None = None
    update_policy: UpdatePolicy | None = None
    os_feed: OsFeed | None = None
    allow_crash_dumps: bool | None = None


class DeviceGroupPublic(Public):
    id: str
    tenant_id: str
    product_id: str
    name: str
    description: str
    update_policy: UpdatePolicy
    os_feed: OsFeed
    allow_crash_dumps: bool
    created_at: dt.datetime


class ProductCreated(BaseModel):
    product: ProductPublic
    device_groups: list[DeviceGroupPublic]


class DeviceClaimItem(Strict):
    device_id: Annotated[str, StringConstraints(max_length=64)]
    public_key: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="the identity public key, PEM SubjectPublicKeyInfo"
    )


class DeviceClaim(Strict):
    devices: list[DeviceClaimItem] = Field(min_length=1, max_length=1000)
    group_id: str | None = Field(default=None, description="put the claimed devices in this group")


class ClaimResultPublic(Public):
    device_id: str
    outcome: ClaimOutcome
    code: str | None
    message: str | None


class ClaimResponse(BaseModel):
    claimed: int
    already_claimed: int
    refused: int
    results: list[ClaimResultPublic]


class DeviceUpdate(Strict):
    group_id: str | None = Field(description="the device's new group, or null for none")


class DevicePublic(Public):
    id: str
    tenant_id: str
    public_key_pem: str
    product_id: str | None
    group_id: str | None
    status: DeviceStatus
    claimed_at: dt.datetime
    revoked_at: dt.datetime | None
    last_attested_at: dt.datetime | None


class Revoke(Strict):
    reason: RevocationReason = RevocationReason.UNSPECIFIED


class RevokedDevice(BaseModel):
    device_id: str
    certificates_revoked: int


class CertificatePublic(Public):
    serial: str
    tenant_id: str
    device_id: str
    issuer_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    pem: str


# ------------------------------------------------------------------ authority


class ReferenceValueItem(Strict):
    component: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    sha256: Sha256Hex


class ReferenceValuesAdd(Strict):
    values: list[ReferenceValueItem] = Field(min_length=1, max_length=1000)


class ReferenceValuesAdded(BaseModel):
    added: int


class SecurityFloorSet(Strict):
    minimum_version: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class SecurityFloorPublic(Public):
    component: str
    minimum_version: str


class CaCertificatePublic(Public):
    id: str
    kind: CaKind
    active: bool
    not_after: dt.datetime
    pem: str


class ProofOfPossessionCreate(Strict):
    verification_code: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    ca: CaKind = CaKind.ROOT


class EventPublic(Public):
    id: int | None
    at: dt.datetime
    kind: str
    code: str
    severity: Severity
    tenant_id: str | None
    device_id: str | None
    actor: str | None
    detail: str


class AuditEntryPublic(BaseModel):
    """One line of an audit-log export (``application/x-ndjson``): an event as an entry of its chain."""

    chain: str = Field(description='the tenant id; "" for events of no tenant')
    seq: int = Field(description="the entry's position in its chain: 1, 2, 3… without gaps")
    at: str = Field(description="UTC, always YYYY-MM-DDTHH:MM:SS.ffffffZ (the form the hash covers)")
    kind: str
    code: str
    severity: Severity
    actor: str | None
    tenant_id: str | None
    device_id: str | None
    detail: str
    prev_hash: str = Field(description="the previous entry's hash (64 zeros before the first)")
    hash: str = Field(description="sha256(prev_hash bytes || canonical entry), hex")
    event_id: int | None = Field(description="the event's id in GET …/events (not hashed)")


class AuditPositionPublic(BaseModel):
    seq: int
    hash: str


class AuditVerificationPublic(BaseModel):
    """What verifying an audit chain found, and where the chain stands (keep ``head`` as an anchor)."""

    ok: bool
    chain: str
    entries_checked: int
    head: AuditPositionPublic | None = Field(description="the chain's head as recorded; null: no entry yet")
    last_verified: AuditPositionPublic | None
    problem: Problem | None = Field(description="why the chain failed verification; null when ok")
    first_bad_seq: int | None
    detail: str


# ------------------------------------------------------------------ hub


class Quarantine(Strict):
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""


class ConnectionPublic(BaseModel):
    device_id: str
    module_id: str | None = Field(
        default=None, description="the module whose session this is; none: the device"
    )
    connected: bool


class TwinPublic(BaseModel):
    device_id: str
    module_id: str | None = Field(
        default=None, description="the module whose twin this is; none: the device's"
    )
    desired: dict[str, Any] = Field(description="desired properties, with $version")
    reported: dict[str, Any] = Field(description="reported properties, with $version")


class DesiredPatched(BaseModel):
    device_id: str
    module_id: str | None = None
    version: int
    pushed: bool = Field(description="whether the patch reached a connected device at once")


class MethodInvoke(Strict):
    payload: Any = Field(
        default=None, description="any JSON value, sent to the device as the method's payload"
    )
    timeout_seconds: int | None = Field(default=None, ge=1, le=300, description="default 30")


class MethodResultPublic(BaseModel):
    status: int = Field(description="the status the device answered with")
    payload: Any = Field(description="the device's payload: JSON if it is JSON, else text")


class CloudToDeviceCreate(Strict):
    body: Annotated[str, StringConstraints(max_length=96 * 1024)] = Field(
        description="text, or base64 with body_base64"
    )
    body_base64: bool = False
    properties: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=128)],
        Annotated[str, StringConstraints(max_length=1024)],
    ] = Field(default_factory=dict, max_length=64)
    ttl_seconds: int | None = Field(default=None, ge=1, le=48 * 3600)


class CloudToDevicePublic(BaseModel):
    id: str
    device_id: str
    state: str
    properties: dict[str, str]
    body: str | None = Field(description="the body as text, if it is UTF-8")
    body_base64: str
    created_at: dt.datetime
    expires_at: dt.datetime
    delivery_count: int
    completed_at: dt.datetime | None


class TelemetryPublic(BaseModel):
    id: int | None = Field(description="the stored id (for paging); none on the live stream")
    device_id: str
    module_id: str | None = Field(default=None, description="the module that sent it; none: the device")
    received_at: dt.datetime
    properties: dict[str, str]
    body: str | None = Field(description="the body as text, if it is UTF-8")
    body_base64: str


# ---------------------------------------------------------------------- device reports


class ReportPublic(BaseModel):
    id: int
    device_id: str
    kind: ReportKind
    component_id: str | None
    signature: str | None = Field(description="what alike failures share; none for a baseline")
    headline: str
    occurred_at: dt.datetime
    received_at: dt.datetime
    report: dict[str, Any] = Field(description="the report as the device sent it, validated")


class FailureSignaturePublic(BaseModel):
    signature: str
    kind: str
    component_id: str | None
    headline: str
    count: int = Field(description="reports with this signature")
    devices: int = Field(description="distinct devices that reported it")
    first_seen: dt.datetime
    last_seen: dt.datetime


class BaselinePublic(BaseModel):
    device_id: str
    received_at: dt.datetime
    baseline: SecurityBaseline
