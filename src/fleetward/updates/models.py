"""The records the updates shells hand out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from fleetward.wire.updates import ImageKind


@dataclass(frozen=True)
class Image:
    """A published image: a signed package, a target of the tenant's image repository."""

    id: str
    tenant_id: str
    product_id: str
    component_id: str
    kind: ImageKind
    version: str
    sha256: str
    length: int
    target_path: str
    created_by: str
    created_at: dt.datetime


@dataclass(frozen=True)
class RepositoryStatus:
    """Where a tenant's image repository is: its root and the current version of each role."""

    tenant_id: str
    initialized: bool
    root_version: int
    root_threshold: int
    root_keyids: tuple[str, ...]
    root_expires: dt.datetime | None
    #: role name → (current version, expiry)
    roles: dict[str, tuple[int, dt.datetime]]
    images: int
