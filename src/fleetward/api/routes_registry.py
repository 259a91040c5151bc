"""Operator routes of the registry: you, tokens, operators, tenants, roles, products, groups, devices."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from fleetward.api import schemas
from fleetward.api.deps import AuthorityDep, PrincipalDep, RegistryDep, as_utc, services
from fleetward.errors import InvalidInput
from fleetward.registry.access import format_scopes
from fleetward.registry.mfa import MfaStatus
from fleetward.registry.models import ApiToken, ClaimOutcome, ClaimRequest, DeviceStatus, Scope
from fleetward.store import events as event_log
from fleetward.store.audit_chain import HEAD_HEADER, ChainPosition, parse_position, to_json_line
from fleetward.store.events import Severity

router = APIRouter(prefix="/v1")
TenantPath = Annotated[str, "tenant id"]
Limit = Annotated[int, Query(ge=1, le=1000)]


def _token_public(token: ApiToken) -> schemas.TokenPublic:
    return schemas.TokenPublic(
        id=token.id,
        name=token.name,
        tenant_id=token.tenant_id,
        scopes=format_scopes(token.scopes).split(","),
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
    )


@router.get("/me", tags=["operators"])
def me(principal: PrincipalDep, registry: RegistryDep) -> schemas.Me:
    """The operator and token behind this request, and the operator's roles."""
    return schemas.Me(
        operator_id=principal.operator_id,
        email=principal.email,
        token_id=principal.token_id,
        token_tenant_id=principal.token_tenant_id,
        scopes=format_scopes(principal.token_scopes).split(","),
        roles=dict(principal.roles),
        can_create_tenants=principal.can_create_tenants,
        mfa_enabled=registry.mfa_status(principal) is MfaStatus.ON,
    )


@router.get("/me/mfa", tags=["operators"])
def mfa_status(principal: PrincipalDep, registry: RegistryDep) -> schemas.MfaStatusPublic:
    """Your MFA: off, pending (enrolled, awaiting a first code) or on."""
    return schemas.MfaStatusPublic(status=registry.mfa_status(principal))


@router.post("/me/mfa", status_code=status.HTTP_201_CREATED, tags=["operators"])
def enroll_mfa(principal: PrincipalDep, registry: RegistryDep) -> schemas.MfaEnrolled:
    """Enrol a TOTP secret (needs an 'admin' token). The secret is shown once; MFA is pending until
    a first code confirms it."""
    enrollment = registry.enroll_mfa(principal)
    return schemas.MfaEnrolled(
        status=MfaStatus.PENDING, secret=enrollment.secret_base32, otpauth_uri=enrollment.otpauth_uri
    )


@router.post("/me/mfa/confirm", tags=["operators"])
def confirm_mfa(
    body: schemas.MfaCode, principal: PrincipalDep, registry: RegistryDep
) -> schemas.MfaStatusPublic:
    """Turn your pending MFA on with a first code from the authenticator app."""
    registry.confirm_mfa(principal, body.code)
    return schemas.MfaStatusPublic(status=MfaStatus.ON)


@router.post("/me/mfa/disable", tags=["operators"])
def disable_mfa(
    body: schemas.MfaCode, principal: PrincipalDep, registry: RegistryDep
) -> schemas.MfaStatusPublic:
    """Turn your MFA off (or drop a pending enrolment), proven with a current code."""
    registry.disable_mfa(principal, body.code)
    return schemas.MfaStatusPublic(status=MfaStatus.OFF)


@router.post("/operators", status_code=status.HTTP_201_CREATED, tags=["operators"])
def create_operator(
    body: schemas.OperatorCreate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.OperatorCreated:
    """Create an operator (needs the right to create tenants). Returns its first token, once."""
    operator, secret = registry.create_operator(principal, body.email, body.name, body.can_create_tenants)
    return schemas.OperatorCreated(operator=schemas.OperatorPublic.model_validate(operator), token=secret)


@router.get("/operators", tags=["operators"])
def list_operators(principal: PrincipalDep, registry: RegistryDep) -> list[schemas.OperatorPublic]:
    return [schemas.OperatorPublic.model_validate(item) for item in registry.list_operators(principal)]


@router.post("/tokens", status_code=status.HTTP_201_CREATED, tags=["operators"])
def create_token(
    body: schemas.TokenCreate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.TokenCreated:
    """A new token for yourself, never broader than the one you call with. The secret is shown once."""
    token, secret = registry.create_token(
        principal, body.name, body.tenant_id, ",".join(body.scopes), body.valid_days, mfa_code=body.mfa_code
    )
    return schemas.TokenCreated(token=_token_public(token), secret=secret)


@router.post("/operators/{email}/tokens", status_code=status.HTTP_201_CREATED, tags=["operators"])
def create_token_for(
    email: str, body: schemas.TokenCreate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.TokenCreated:
    """A new token for another operator (operators who may create tenants only). The secret is shown once."""
    token, secret = registry.create_token(
        principal,
        body.name,
        body.tenant_id,
        ",".join(body.scopes),
        body.valid_days,
        for_email=email,
        mfa_code=body.mfa_code,
    )
    return schemas.TokenCreated(token=_token_public(token), secret=secret)


@router.get("/events", tags=["events"])
def list_platform_events(
    principal: PrincipalDep,
    registry: RegistryDep,
    device_id: str | None = None,
    kind: str | None = None,
    limit: Limit = 100,
) -> list[schemas.EventPublic]:
    """Events of no tenant, newest first: operators created, refusals of devices no tenant claimed."""
    events = registry.list_platform_events(principal, device_id=device_id, kind=kind, limit=limit)
    return [schemas.EventPublic.model_validate(event) for event in events]


@router.get("/tokens", tags=["operators"])
def list_tokens(principal: PrincipalDep, registry: RegistryDep) -> list[schemas.TokenPublic]:
    return [_token_public(token) for token in registry.list_tokens(principal)]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["operators"])
def revoke_token(token_id: str, principal: PrincipalDep, registry: RegistryDep) -> Response:
    registry.revoke_token(principal, token_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/tenants", status_code=status.HTTP_201_CREATED, tags=["tenants"])
def create_tenant(
    body: schemas.TenantCreate, principal: PrincipalDep, registry: RegistryDep, authority: AuthorityDep
) -> schemas.TenantPublic:
    """Create a tenant and its CA hierarchy; you become its Administrator."""
    tenant = registry.create_tenant(principal, body.name)
    authority.ensure_hierarchy(tenant.id)
    return schemas.TenantPublic.model_validate(tenant)


@router.get("/tenants", tags=["tenants"])
def list_tenants(principal: PrincipalDep, registry: RegistryDep) -> list[schemas.TenantPublic]:
    """The tenants you hold a role in (and your token reaches)."""
    return [schemas.TenantPublic.model_validate(item) for item in registry.list_tenants(principal)]


@router.get("/tenants/{tenant_id}", tags=["tenants"])
def get_tenant(tenant_id: str, principal: PrincipalDep, registry: RegistryDep) -> schemas.TenantPublic:
    principal.require(tenant_id, Scope.READ)
    return schemas.TenantPublic.model_validate(registry.get_tenant(tenant_id))


@router.get("/tenants/{tenant_id}/roles", tags=["roles"])
def list_roles(tenant_id: str, principal: PrincipalDep, registry: RegistryDep) -> list[schemas.RolePublic]:
    return [schemas.RolePublic.model_validate(item) for item in registry.list_roles(principal, tenant_id)]


@router.put("/tenants/{tenant_id}/roles", tags=["roles"])
def assign_role(
    tenant_id: str, body: schemas.RoleAssign, principal: PrincipalDep, registry: RegistryDep
) -> schemas.RolePublic:
    """Give an operator a role in this tenant, or change it (Administrators only)."""
    return schemas.RolePublic.model_validate(
        registry.assign_role(principal, tenant_id, body.email, body.role)
    )


@router.delete("/tenants/{tenant_id}/roles/{email}", status_code=204, tags=["roles"])
def remove_role(tenant_id: str, email: str, principal: PrincipalDep, registry: RegistryDep) -> Response:
    registry.remove_role(principal, tenant_id, email)
    return Response(status_code=204)


@router.post("/tenants/{tenant_id}/products", status_code=201, tags=["products"])
def create_product(
    tenant_id: str, body: schemas.ProductCreate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.ProductCreated:
    """Create a product with its five default device groups."""
    product, groups = registry.create_product(principal, tenant_id, body.name, body.description)
    return schemas.ProductCreated(
        product=schemas.ProductPublic.model_validate(product),
        device_groups=[schemas.DeviceGroupPublic.model_validate(group) for group in groups],
    )


@router.get("/tenants/{tenant_id}/products", tags=["products"])
def list_products(
    tenant_id: str, principal: PrincipalDep, registry: RegistryDep
) -> list[schemas.ProductPublic]:
    return [schemas.ProductPublic.model_validate(p) for p in registry.list_products(principal, tenant_id)]


@router.get("/tenants/{tenant_id}/products/{product}", tags=["products"])
def get_product(
    tenant_id: str, product: str, principal: PrincipalDep, registry: RegistryDep
) -> schemas.ProductPublic:
    """A product by id or name."""
    return schemas.ProductPublic.model_validate(registry.get_product(principal, tenant_id, product))


@router.patch("/tenants/{tenant_id}/products/{product}", tags=["products"])
def update_product(
    tenant_id: str, product: str, body: schemas.ProductUpdate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.ProductPublic:
    return schemas.ProductPublic.model_validate(
        registry.update_product(principal, tenant_id, product, body.description)
    )


@router.delete("/tenants/{tenant_id}/products/{product}", status_code=204, tags=["products"])
def delete_product(tenant_id: str, product: str, principal: PrincipalDep, registry: RegistryDep) -> Response:
    """Delete a product and its groups; refused while devices belong to it."""
    registry.delete_product(principal, tenant_id, product)
    return Response(status_code=204)


@router.post("/tenants/{tenant_id}/device-groups", status_code=201, tags=["device groups"])
def create_group(
    tenant_id: str, body: schemas.DeviceGroupCreate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DeviceGroupPublic:
    group = registry.create_group(
        principal,
        tenant_id,
        body.product,
        body.name,
        body.description,
        body.update_policy,
        body.os_feed,
        body.allow_crash_dumps,
    )
    return schemas.DeviceGroupPublic.model_validate(group)


@router.get("/tenants/{tenant_id}/device-groups", tags=["device groups"])
def list_groups(
    tenant_id: str, principal: PrincipalDep, registry: RegistryDep, product: str | None = None
) -> list[schemas.DeviceGroupPublic]:
    return [
        schemas.DeviceGroupPublic.model_validate(group)
        for group in registry.list_groups(principal, tenant_id, product)
    ]


@router.get("/tenants/{tenant_id}/device-groups/{group_id}", tags=["device groups"])
def get_group(
    tenant_id: str, group_id: str, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DeviceGroupPublic:
    return schemas.DeviceGroupPublic.model_validate(registry.get_group(principal, tenant_id, group_id))


@router.patch("/tenants/{tenant_id}/device-groups/{group_id}", tags=["device groups"])
def update_group(
    tenant_id: str,
    group_id: str,
    body: schemas.DeviceGroupUpdate,
    principal: PrincipalDep,
    registry: RegistryDep,
) -> schemas.DeviceGroupPublic:
    """Rename a group or change its update policy, OS feed or crash-dump setting."""
    group = registry.update_group(
        principal,
        tenant_id,
        group_id,
        name=body.name,
        description=body.description,
        update_policy=body.update_policy,
        os_feed=body.os_feed,
        allow_crash_dumps=body.allow_crash_dumps,
    )
    return schemas.DeviceGroupPublic.model_validate(group)


@router.delete("/tenants/{tenant_id}/device-groups/{group_id}", status_code=204, tags=["device groups"])
def delete_group(tenant_id: str, group_id: str, principal: PrincipalDep, registry: RegistryDep) -> Response:
    registry.delete_group(principal, tenant_id, group_id)
    return Response(status_code=204)


@router.post("/tenants/{tenant_id}/devices/claim", tags=["devices"])
def claim_devices(
    tenant_id: str, body: schemas.DeviceClaim, principal: PrincipalDep, registry: RegistryDep
) -> schemas.ClaimResponse:
    """Claim up to 1,000 devices by id and identity public key, each once and into one tenant only."""
    results = registry.claim_devices(
        principal,
        tenant_id,
        [ClaimRequest(item.device_id, item.public_key.encode("ascii", "replace")) for item in body.devices],
        body.group_id,
    )
    return schemas.ClaimResponse(
        claimed=sum(result.outcome is ClaimOutcome.CLAIMED for result in results),
        already_claimed=sum(result.outcome is ClaimOutcome.ALREADY_CLAIMED for result in results),
        refused=sum(result.outcome is ClaimOutcome.REFUSED for result in results),
        results=[schemas.ClaimResultPublic.model_validate(result) for result in results],
    )


@router.get("/tenants/{tenant_id}/devices", tags=["devices"])
def list_devices(
    tenant_id: str,
    principal: PrincipalDep,
    registry: RegistryDep,
    group_id: str | None = None,
    product: str | None = None,
    status: DeviceStatus | None = None,
    limit: Limit = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[schemas.DevicePublic]:
    devices = registry.list_devices(
        principal, tenant_id, group_id=group_id, product=product, status=status, limit=limit, offset=offset
    )
    return [schemas.DevicePublic.model_validate(device) for device in devices]


@router.get("/tenants/{tenant_id}/devices/{device_id}", tags=["devices"])
def get_device(
    tenant_id: str, device_id: str, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DevicePublic:
    return schemas.DevicePublic.model_validate(registry.get_device(principal, tenant_id, device_id))


@router.patch("/tenants/{tenant_id}/devices/{device_id}", tags=["devices"])
def move_device(
    tenant_id: str, device_id: str, body: schemas.DeviceUpdate, principal: PrincipalDep, registry: RegistryDep
) -> schemas.DevicePublic:
    """Move a device to another group (and so to that group's product)."""
    return schemas.DevicePublic.model_validate(
        registry.move_device(principal, tenant_id, device_id, body.group_id)
    )


@router.get("/tenants/{tenant_id}/events", tags=["events"])
def list_events(
    tenant_id: str,
    principal: PrincipalDep,
    registry: RegistryDep,
    device_id: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    limit: Limit = 100,
    group_id: str | None = None,
    until: dt.datetime | None = None,
    code: str | None = None,
    severity: Severity | None = None,
) -> list[schemas.EventPublic]:
    """Events of the tenant, newest first: what operators did, what devices did, every refusal. Filter by
    device, group (the devices in it now), kind, code, severity and time (``since`` ≤ at < ``until``)."""
    events = registry.list_events(
        principal,
        tenant_id,
        device_id=device_id,
        kind=kind,
        since=as_utc(since),
        limit=limit,
        group_id=group_id,
        until=as_utc(until),
        code=code,
        severity=severity,
    )
    return [schemas.EventPublic.model_validate(event) for event in events]


# ------------------------------------------------------------------ the audit log (ADR 0016)

#: the most entries one export request streams (page on with ``after_seq``)
AUDIT_EXPORT_MAX = 100_000
AnchorQuery = Annotated[
    str | None, Query(max_length=96, description="SEQ:HASH kept from an earlier export or verification")
]
AfterSeq = Annotated[int, Query(ge=0, description="export the entries after this position")]
ExportLimit = Annotated[int, Query(ge=1, le=AUDIT_EXPORT_MAX)]
_NDJSON: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/x-ndjson": {"schema": schemas.AuditEntryPublic.model_json_schema()}},
        "description": "one entry per line, in chain order; the header Fleetward-Audit-Head gives SEQ:HASH",
    }
}


def _export(request: Request, chain: str, after_seq: int, limit: int) -> StreamingResponse:
    database = services(request).database
    with database.read() as connection:
        head = event_log.audit_head(connection, chain)
    headers = {"Cache-Control": "no-store"}
    if head is not None:
        headers[HEAD_HEADER] = str(head)

    def lines() -> Iterator[bytes]:
        if head is None:
            return
        entries = event_log.read_chain(database, chain, after_seq=after_seq, until_seq=head.seq, limit=limit)
        for entry in entries:
            yield to_json_line(entry)

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


def _verify(request: Request, chain: str, anchor: str | None) -> schemas.AuditVerificationPublic:
    try:
        anchored = parse_position(anchor) if anchor is not None else None
    except ValueError as error:
        raise InvalidInput(str(error), code="bad_anchor") from None
    found, head = event_log.verify_chain(services(request).database, chain, anchor=anchored)
    return schemas.AuditVerificationPublic(
        ok=found.ok,
        chain=chain,
        entries_checked=found.checked,
        head=_position(head),
        last_verified=_position(found.last_good),
        problem=found.problem,
        first_bad_seq=found.first_bad_seq,
        detail=found.detail,
    )


def _position(at: ChainPosition | None) -> schemas.AuditPositionPublic | None:
    return None if at is None else schemas.AuditPositionPublic(seq=at.seq, hash=at.hash)


@router.get(
    "/tenants/{tenant_id}/audit-log",
    tags=["audit log"],
    response_class=StreamingResponse,
    responses=_NDJSON,
)
def export_audit_log(
    request: Request,
    tenant_id: str,
    principal: PrincipalDep,
    after_seq: AfterSeq = 0,
    limit: ExportLimit = AUDIT_EXPORT_MAX,
) -> StreamingResponse:
    """The tenant's audit log as JSON lines, in chain order, up to the head read when the request began."""
    principal.require(tenant_id, Scope.READ)
    return _export(request, tenant_id, after_seq, limit)


@router.get("/tenants/{tenant_id}/audit-log/verify", tags=["audit log"])
def verify_audit_log(
    request: Request, tenant_id: str, principal: PrincipalDep, anchor: AnchorQuery = None
) -> schemas.AuditVerificationPublic:
    """Verify the tenant's audit chain against its head (and an anchor, if given)."""
    principal.require(tenant_id, Scope.READ)
    return _verify(request, tenant_id, anchor)


@router.get(
    "/audit-log",
    tags=["audit log"],
    response_class=StreamingResponse,
    responses=_NDJSON,
)
def export_platform_audit_log(
    request: Request,
    principal: PrincipalDep,
    after_seq: AfterSeq = 0,
    limit: ExportLimit = AUDIT_EXPORT_MAX,
) -> StreamingResponse:
    """The audit log of events of no tenant (platform operators only), as JSON lines."""
    principal.require_tenant_creation()
    return _export(request, "", after_seq, limit)


@router.get("/audit-log/verify", tags=["audit log"])
def verify_platform_audit_log(
    request: Request, principal: PrincipalDep, anchor: AnchorQuery = None
) -> schemas.AuditVerificationPublic:
    """Verify the audit chain of events of no tenant (platform operators only)."""
    principal.require_tenant_creation()
    return _verify(request, "", anchor)
