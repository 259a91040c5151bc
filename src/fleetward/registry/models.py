"""Typed records of the registry, as the services hand them out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """An operator's role in a tenant, as in Azure Sphere."""

    ADMINISTRATOR = "Administrator"
    CONTRIBUTOR = "Contributor"
    READER = "Reader"


class Scope(StrEnum):
    """What a request may do. A role grants scopes; a token may carry fewer."""

    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    ADMIN = "admin"


class UpdatePolicy(StrEnum):
    """Which cloud updates the devices of a group accept."""

    UPDATE_ALL = "UpdateAll"
    NO_THIRD_PARTY_APP_UPDATES = "No3rdPartyAppUpdates"
    NO_UPDATES = "NoUpdates"


class OsFeed(StrEnum):
    """Which platform releases a group sees: the retail feed, or the evaluation feed that comes first."""

    RETAIL = "Retail"
    RETAIL_EVAL = "RetailEval"


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class GroupTemplate:
    name: str
    description: str
    update_policy: UpdatePolicy
    os_feed: OsFeed


#: The groups every new product gets, with Azure Sphere's defaults.
DEFAULT_GROUPS: tuple[GroupTemplate, ...] = (
    GroupTemplate(
        "Development",
        "Devices on a developer's desk: applications come from the developer, not the cloud.",
        UpdatePolicy.NO_THIRD_PARTY_APP_UPDATES,
        OsFeed.RETAIL,
    ),
    GroupTemplate(
        "Field Test",
        "Devices in lab or field testing: they receive every cloud update.",
        UpdatePolicy.UPDATE_ALL,
        OsFeed.RETAIL,
    ),
    GroupTemplate(
        "Production",
        "Devices in production: they receive every cloud update.",
        UpdatePolicy.UPDATE_ALL,
        OsFeed.RETAIL,
    ),
    GroupTemplate(
        "Production OS Evaluation",
        "Production software on the evaluation platform feed, to catch a platform regression first.",
        UpdatePolicy.UPDATE_ALL,
        OsFeed.RETAIL_EVAL,
    ),
    GroupTemplate(
        "Field Test OS Evaluation",
        "Field-test software on the evaluation platform feed.",
        UpdatePolicy.UPDATE_ALL,
        OsFeed.RETAIL_EVAL,
    ),
)


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: dt.datetime


@dataclass(frozen=True)
class Operator:
    id: str
    email: str
    name: str
    can_create_tenants: bool
    created_at: dt.datetime
    #: a TOTP second factor is on (confirmed with a first code); the secret itself never leaves the store
    mfa_enabled: bool = False


@dataclass(frozen=True)
class RoleAssignment:
    tenant_id: str
    operator_id: str
    email: str
    role: Role
    created_at: dt.datetime


@dataclass(frozen=True)
class ApiToken:
    id: str
    operator_id: str
    tenant_id: str | None
    name: str
    scopes: frozenset[Scope]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class Product:
    id: str
    tenant_id: str
    name: str
    description: str
    created_at: dt.datetime


@dataclass(frozen=True)
class DeviceGroup:
    id: str
    tenant_id: str
    product_id: str
    name: str
    description: str
    update_policy: UpdatePolicy
    os_feed: OsFeed
    allow_crash_dumps: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class Device:
    id: str
    tenant_id: str
    public_key_pem: str
    product_id: str | None
    group_id: str | None
    status: DeviceStatus
    claimed_at: dt.datetime
    revoked_at: dt.datetime | None
    last_attested_at: dt.datetime | None


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    ALREADY_CLAIMED = "already_claimed"
    REFUSED = "refused"


@dataclass(frozen=True)
class ClaimRequest:
    device_id: str
    public_key: bytes


@dataclass(frozen=True)
class ClaimResult:
    device_id: str
    outcome: ClaimOutcome
    code: str | None = None
    message: str | None = None
