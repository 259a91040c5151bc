"""Operator routes of the authority: CA certificates, revocation, certificates, reference values, CRLs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from fleetward.api import schemas
from fleetward.api.deps import AuthorityDep, PrincipalDep, services
from fleetward.authority.service import CaKind, ReferenceValue

router = APIRouter(prefix="/v1")
PEM = "application/x-pem-file"


@router.get(
    "/tenants/{tenant_id}/ca/chain",
    tags=["certificate authority"],
    response_class=Response,
    responses={200: {"content": {PEM: {}}, "description": "issuing CA then root CA, PEM"}},
)
def ca_chain(tenant_id: str, principal: PrincipalDep, authority: AuthorityDep) -> Response:
    """The tenant's CA chain, to trust its devices' certificates elsewhere."""
    return Response("".join(authority.chain_pem(principal, tenant_id)), media_type=PEM)


@router.get("/tenants/{tenant_id}/ca/certificates", tags=["certificate authority"])
def ca_certificates(
    tenant_id: str, principal: PrincipalDep, authority: AuthorityDep
) -> list[schemas.CaCertificatePublic]:
    return [
        schemas.CaCertificatePublic.model_validate(item)
        for item in authority.ca_certificates(principal, tenant_id)
    ]


@router.post(
    "/tenants/{tenant_id}/ca/proof-of-possession",
    tags=["certificate authority"],
    response_class=Response,
    responses={200: {"content": {PEM: {}}, "description": "a certificate with CN = the code"}},
)
def proof_of_possession(
    tenant_id: str, body: schemas.ProofOfPossessionCreate, principal: PrincipalDep, authority: AuthorityDep
) -> Response:
    """A certificate whose subject is a third party's verification code, signed by the tenant CA."""
    pem = authority.proof_of_possession(principal, tenant_id, body.verification_code, body.ca)
    return Response(pem, media_type=PEM)


def _crl_response(tenant_id: str, authority: AuthorityDep, kind: CaKind) -> Response:
    return Response(
        authority.crl_der(tenant_id, kind),
        media_type="application/pkix-crl",
        headers={"Cache-Control": "public, max-age=60"},
    )


_CRL_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/pkix-crl": {}}, "description": "DER CRL"}
}


@router.get("/tenants/{tenant_id}/crl", tags=["revocation"], response_class=Response, responses=_CRL_DOC)
def crl(tenant_id: str, authority: AuthorityDep) -> Response:
    """The issuing CA's CRL (public, no token): revoked operational certificates still within validity."""
    return _crl_response(tenant_id, authority, CaKind.ISSUING)


@router.get("/tenants/{tenant_id}/crl/root", tags=["revocation"], response_class=Response, responses=_CRL_DOC)
def root_crl(tenant_id: str, authority: AuthorityDep) -> Response:
    """The root CA's CRL (public, no token)."""
    return _crl_response(tenant_id, authority, CaKind.ROOT)


@router.post("/tenants/{tenant_id}/devices/{device_id}/revoke", tags=["revocation"])
def revoke_device(
    tenant_id: str, device_id: str, body: schemas.Revoke, principal: PrincipalDep, authority: AuthorityDep
) -> schemas.RevokedDevice:
    """Refuse the device any new certificate and revoke every certificate it holds."""
    count = authority.revoke_device(principal, tenant_id, device_id, body.reason)
    return schemas.RevokedDevice(device_id=device_id, certificates_revoked=count)


@router.get("/tenants/{tenant_id}/certificates", tags=["certificates"])
def list_certificates(
    tenant_id: str,
    principal: PrincipalDep,
    authority: AuthorityDep,
    device_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[schemas.CertificatePublic]:
    return [
        schemas.CertificatePublic.model_validate(item)
        for item in authority.list_certificates(principal, tenant_id, device_id, limit)
    ]


@router.get("/tenants/{tenant_id}/certificates/{serial}", tags=["certificates"])
def get_certificate(
    tenant_id: str, serial: str, principal: PrincipalDep, authority: AuthorityDep
) -> schemas.CertificatePublic:
    return schemas.CertificatePublic.model_validate(authority.get_certificate(principal, tenant_id, serial))


@router.post("/tenants/{tenant_id}/certificates/{serial}/revoke", tags=["revocation"])
def revoke_certificate(
    tenant_id: str, serial: str, body: schemas.Revoke, principal: PrincipalDep, authority: AuthorityDep
) -> schemas.CertificatePublic:
    """Revoke one certificate; the CRL is regenerated at once."""
    return schemas.CertificatePublic.model_validate(
        authority.revoke_certificate(principal, tenant_id, serial, body.reason)
    )


@router.post("/tenants/{tenant_id}/reference-values", tags=["reference values"])
def add_reference_values(
    tenant_id: str, body: schemas.ReferenceValuesAdd, principal: PrincipalDep, authority: AuthorityDep
) -> schemas.ReferenceValuesAdded:
    """Register components devices may run: name, version and SHA-256 of the image."""
    added = authority.add_reference_values(
        principal,
        tenant_id,
        [ReferenceValue(item.component, item.version, item.sha256) for item in body.values],
    )
    return schemas.ReferenceValuesAdded(added=added)


@router.get("/tenants/{tenant_id}/reference-values", tags=["reference values"])
def list_reference_values(
    tenant_id: str, principal: PrincipalDep, authority: AuthorityDep, component: str | None = None
) -> list[schemas.ReferenceValueItem]:
    return [
        schemas.ReferenceValueItem(component=item.component, version=item.version, sha256=item.sha256)
        for item in authority.list_reference_values(principal, tenant_id, component)
    ]


@router.delete(
    "/tenants/{tenant_id}/reference-values/{component:path}/{version}/{sha256}",
    status_code=204,
    tags=["reference values"],
)
def remove_reference_value(
    tenant_id: str,
    component: str,
    version: str,
    sha256: str,
    principal: PrincipalDep,
    authority: AuthorityDep,
) -> Response:
    authority.remove_reference_value(principal, tenant_id, ReferenceValue(component, version, sha256))
    return Response(status_code=204)


@router.put("/tenants/{tenant_id}/security-floors/{component:path}", tags=["reference values"])
def set_floor(
    tenant_id: str,
    component: str,
    body: schemas.SecurityFloorSet,
    request: Request,
    principal: PrincipalDep,
    authority: AuthorityDep,
) -> schemas.SecurityFloorPublic:
    """Refuse attestation of the component below this version from now on (and updates to below it: the
    floors are published in the image repository's product roles)."""
    floor = authority.set_floor(principal, tenant_id, component, body.minimum_version)
    services(request).images.publish_floors(principal, tenant_id)
    return schemas.SecurityFloorPublic.model_validate(floor)


@router.get("/tenants/{tenant_id}/security-floors", tags=["reference values"])
def list_floors(
    tenant_id: str, principal: PrincipalDep, authority: AuthorityDep
) -> list[schemas.SecurityFloorPublic]:
    return [
        schemas.SecurityFloorPublic.model_validate(f) for f in authority.list_floors(principal, tenant_id)
    ]
