"""API schemas of the image repository and images, one per direction (see ``schemas.py``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetward.wire.updates import ImageKind

PublicKeyPem = Annotated[str, StringConstraints(min_length=64, max_length=1024)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RootProposalCreate(Strict):
    root_keys: list[PublicKeyPem] = Field(
        min_length=1, max_length=16, description="the offline root keys' public halves, PEM (ECDSA P-256)"
    )
    threshold: int = Field(ge=1, le=16, description="how many of the root keys must sign each root")
    rotation: bool = Field(
        default=False,
        description="a rotation of the current root (refused when there is none); false: the first root "
        "(refused once the repository has one: `repository_initialized`)",
    )
    rotate_online: bool = Field(default=False, description="new online keys (targets, snapshot, …)")


class RootAccepted(BaseModel):
    version: int


class RoleVersion(BaseModel):
    role: str
    version: int
    expires: dt.datetime


class RepositoryStatusPublic(BaseModel):
    tenant_id: str
    initialized: bool
    root_version: int
    root_threshold: int
    root_keyids: list[str]
    root_expires: dt.datetime | None
    roles: list[RoleVersion]
    images: int


class ImageCreate(Strict):
    product_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    kind: ImageKind = ImageKind.APP
    package_base64: str = Field(description="the package (an uncompressed tar), base64")
    signature_base64: Annotated[str, StringConstraints(min_length=8, max_length=512)] = Field(
        description="the publisher's detached ECDSA P-256 signature of the package (DER), base64"
    )


class ImagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

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
