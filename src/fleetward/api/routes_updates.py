"""Routes of the image repository: what devices read (metadata, targets) and what operators manage (the
root, images).

Devices authenticate with their ``FleetwardDevice`` token (``device_auth.py``); the tenant is the tenant of
their certificate, never one the request names. Targets support ``Range: bytes=N-`` for resumable
downloads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
from typing import Annotated, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, Query, Request, Response
from securesystemslib.signer import Key, SSlibKey

from fleetward.api import schemas_images as schemas
from fleetward.api.deps import PrincipalDep, services
from fleetward.api.device_auth import DeviceDep, UpdateDevice
from fleetward.errors import InvalidInput, NotFound
from fleetward.registry.models import Scope
from fleetward.updates.images import ImageService
from fleetward.updates.models import Image
from fleetward.wire.updates import product_of

router = APIRouter()
TUF_JSON = "application/json"
OCTETS = "application/octet-stream"
_RANGE = re.compile(r"^bytes=(\d{1,15})-(\d{1,15})?$")
_PRODUCT_ROLE = re.compile(r"^\d+\.product-(.+)\.json$")


def images(request: Request) -> ImageService:
    return services(request).images


ImagesDep = Annotated[ImageService, Depends(images)]

# ------------------------------------------------------------------ devices


@router.get(
    "/updates/v1/metadata/{name}",
    tags=["updates (devices)"],
    response_class=Response,
    responses={200: {"content": {TUF_JSON: {}}, "description": "signed TUF metadata"}},
)
async def metadata(name: str, device: DeviceDep, service: ImagesDep) -> Response:
    """TUF metadata of the device's tenant: ``timestamp.json`` or ``N.<role>.json``."""
    _own_product(device, _PRODUCT_ROLE.match(name))
    body = await asyncio.to_thread(service.metadata, device.tenant_id, name)
    return Response(body, media_type=TUF_JSON, headers={"Cache-Control": "no-store"})


@router.get(
    "/updates/v1/targets/{path:path}",
    tags=["updates (devices)"],
    response_class=Response,
    responses={
        200: {"content": {OCTETS: {}}, "description": "the target's bytes"},
        206: {"content": {OCTETS: {}}, "description": "the requested range"},
    },
)
async def target(path: str, request: Request, device: DeviceDep, service: ImagesDep) -> Response:
    """A target by its hash-prefixed path (``<product>/<component>/<version>/<sha256>.image.tar``)."""
    if device.product_id is None or product_of(path) != device.product_id:  # default deny: own product only
        raise NotFound("no such target", code="target_not_found")
    data = await asyncio.to_thread(service.target, device.tenant_id, path)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
    wanted = request.headers.get("range")
    if wanted is None:
        return Response(data, media_type=OCTETS, headers=headers)
    match = _RANGE.fullmatch(wanted.strip())
    start = int(match.group(1)) if match else -1
    end = int(match.group(2)) if match and match.group(2) else len(data) - 1
    if match is None or start >= len(data) or end < start:
        return Response(
            status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"}, media_type=OCTETS
        )
    end = min(end, len(data) - 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return Response(data[start : end + 1], status_code=206, media_type=OCTETS, headers=headers)


def _own_product(device: UpdateDevice, match: re.Match[str] | None) -> None:
    if match is not None and match.group(1) != device.product_id:  # a device without a product sees none
        raise NotFound("no such metadata", code="metadata_not_found")


# ------------------------------------------------------------------ operators: the repository


def _status(status: Any) -> schemas.RepositoryStatusPublic:
    return schemas.RepositoryStatusPublic(
        tenant_id=status.tenant_id,
        initialized=status.initialized,
        root_version=status.root_version,
        root_threshold=status.root_threshold,
        root_keyids=list(status.root_keyids),
        root_expires=status.root_expires,
        roles=[
            schemas.RoleVersion(role=role, version=version, expires=expires)
            for role, (version, expires) in status.roles.items()
        ],
        images=status.images,
    )


@router.get("/v1/tenants/{tenant_id}/repository", tags=["image repository"])
def repository_status(
    tenant_id: str, principal: PrincipalDep, service: ImagesDep
) -> schemas.RepositoryStatusPublic:
    """The image repository's root (version, threshold, keys) and the current version of each role."""
    return _status(service.status(principal, tenant_id))


def _root_key(pem: str) -> Key:
    try:
        public = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeError, UnsupportedAlgorithm):
        raise InvalidInput("a root key is not a PEM public key", code="root_keys_invalid") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise InvalidInput("root keys are ECDSA P-256 keys", code="root_keys_invalid")
    return SSlibKey.from_crypto(public)


@router.post(
    "/v1/tenants/{tenant_id}/repository/root-proposal",
    tags=["image repository"],
    response_class=Response,
    responses={200: {"content": {TUF_JSON: {}}, "description": "an unsigned root to sign offline"}},
)
def propose_root(
    tenant_id: str, body: schemas.RootProposalCreate, principal: PrincipalDep, service: ImagesDep
) -> Response:
    """The root the server proposes for these offline keys: sign it with them and PUT it back. The first
    root (``rotation`` false) is refused once the repository has one; a rotation, while it has none."""
    keys = [_root_key(pem) for pem in body.root_keys]
    proposal = service.propose_root(
        principal, tenant_id, keys, body.threshold, body.rotate_online, rotation=body.rotation
    )
    return Response(proposal, media_type=TUF_JSON)


@router.put("/v1/tenants/{tenant_id}/repository/root", tags=["image repository"])
async def accept_root(
    tenant_id: str, request: Request, principal: PrincipalDep, service: ImagesDep
) -> schemas.RootAccepted:
    """Upload a signed root (its own threshold of signatures, and the previous root's for a rotation)."""
    body = await request.body()
    version = await asyncio.to_thread(service.accept_root, principal, tenant_id, body)
    return schemas.RootAccepted(version=version)


@router.get(
    "/v1/tenants/{tenant_id}/repository/root",
    tags=["image repository"],
    response_class=Response,
    responses={200: {"content": {TUF_JSON: {}}, "description": "the current signed root"}},
)
def trusted_root(tenant_id: str, principal: PrincipalDep, service: ImagesDep) -> Response:
    """The current root, what devices are provisioned with."""
    principal.require(tenant_id, Scope.READ)
    return Response(service.trusted_root_bytes(tenant_id), media_type=TUF_JSON)


@router.post("/v1/tenants/{tenant_id}/repository/floors", status_code=204, tags=["image repository"])
def publish_floors(tenant_id: str, principal: PrincipalDep, service: ImagesDep) -> Response:
    """Publish the tenant's security floors into every product role now."""
    service.publish_floors(principal, tenant_id)
    return Response(status_code=204)


# ------------------------------------------------------------------ operators: images


def _decoded(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the {what} is not base64", code="invalid_input") from None


@router.post("/v1/tenants/{tenant_id}/images", status_code=201, tags=["images"])
async def add_image(
    tenant_id: str, body: schemas.ImageCreate, principal: PrincipalDep, service: ImagesDep
) -> schemas.ImagePublic:
    """Publish a signed package as an image of a product: a new target of the image repository."""
    package = _decoded(body.package_base64, "package")
    signature = _decoded(body.signature_base64, "signature")
    image = await asyncio.to_thread(
        functools.partial(
            service.add_image,
            principal,
            tenant_id,
            body.product_id,
            package,
            signature,
            body.version,
            body.kind,
        )
    )
    return _public(image)


def _public(image: Image) -> schemas.ImagePublic:
    return schemas.ImagePublic.model_validate(image)


@router.get("/v1/tenants/{tenant_id}/images", tags=["images"])
def list_images(
    tenant_id: str,
    principal: PrincipalDep,
    service: ImagesDep,
    product_id: str | None = None,
    component_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.ImagePublic]:
    return [
        _public(image) for image in service.list_images(principal, tenant_id, product_id, component_id, limit)
    ]


@router.get("/v1/tenants/{tenant_id}/images/{image_id}", tags=["images"])
def get_image(
    tenant_id: str, image_id: str, principal: PrincipalDep, service: ImagesDep
) -> schemas.ImagePublic:
    return _public(service.get_image(principal, tenant_id, image_id))
