"""The registry and the authority's operator routes, through the real server on both stores.

Products and their default groups, device groups, claims, moves and listings; roles, tokens and their
refusals; tenant isolation; secrets at rest; the CA chain, proof of possession and the public CRLs.
Refusals are checked on the wire: HTTP status and the stable ``error.code``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from fleetward.agent.enroll import OperationalCredential
from fleetward.api import schemas
from fleetward.authority.keystore import MasterKeyStore
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services, build_services
from fleetward.config import Limits, Settings
from fleetward.errors import AttestationRefused, ConfigurationError
from fleetward.registry.models import OsFeed, Role, UpdatePolicy
from fleetward.server import BackgroundServer, free_port
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store.schema import api_tokens, certificate_authorities, metadata
from fleetward.wire.identity import device_id_for
from tests.conftest import TenantSetup, healthy_software, make_tenant

ADMIN_EMAIL = "admin@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(response: httpx.Response) -> tuple[int, str]:
    """The HTTP status and the ``error.code`` of a refusal."""
    body: Any = response.json()
    assert "error" in body, f"expected a refusal, got {response.status_code}: {response.text[:300]}"
    return response.status_code, str(body["error"]["code"])


def claim_body(*devices: SimulatedDevice, group_id: str | None = None) -> dict[str, Any]:
    return {"devices": [device.claim_item().model_dump() for device in devices], "group_id": group_id}


def pem_of(key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def enroll(server: BackgroundServer, device: SimulatedDevice) -> OperationalCredential:
    async def run() -> OperationalCredential:
        async with httpx.AsyncClient(timeout=30) as http:
            return await device.enroll(server.url, http)

    return asyncio.run(run())


@dataclass
class Member:
    """Another operator: a raw HTTP client and a typed client, both with the operator's first token."""

    email: str
    token: str
    http: httpx.Client
    client: FleetwardClient


class Team:
    """Creates operators (as the bootstrap admin) and, if asked, gives them a role in a tenant."""

    def __init__(self, url: str, admin: FleetwardClient, stack: ExitStack) -> None:
        self._url = url
        self._admin = admin
        self._stack = stack

    def join(
        self,
        email: str,
        *,
        role: Role | None = None,
        tenant_id: str | None = None,
        can_create_tenants: bool = False,
    ) -> Member:
        created = self._admin.post(
            "/v1/operators",
            schemas.OperatorCreate(
                email=email, name=email.split("@")[0], can_create_tenants=can_create_tenants
            ),
            schemas.OperatorCreated,
        )
        if role is not None:
            assert tenant_id is not None
            self._admin.put(
                f"/v1/tenants/{tenant_id}/roles",
                schemas.RoleAssign(email=email, role=role),
                schemas.RolePublic,
            )
        http = self._stack.enter_context(httpx.Client(base_url=self._url, headers=bearer(created.token)))
        client = self._stack.enter_context(FleetwardClient(self._url, created.token))
        return Member(email, created.token, http, client)


@pytest.fixture
def team(server: BackgroundServer, admin: FleetwardClient) -> Iterator[Team]:
    with ExitStack() as stack:
        yield Team(server.url, admin, stack)


@pytest.fixture
def admin_http(server: BackgroundServer, admin_token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=bearer(admin_token)) as http:
        yield http


@pytest.fixture
def anonymous(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url) as http:
        yield http


def devices_of(tenant: TenantSetup, **params: str | int) -> list[schemas.DevicePublic]:
    return tenant.client.get_list(f"/v1/tenants/{tenant.id}/devices", schemas.DevicePublic, dict(params))


# ------------------------------------------------------------------ products and device groups


def test_a_product_comes_with_the_five_azure_sphere_default_groups(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    """Development takes no cloud app updates; the OS Evaluation twins follow the RetailEval feed."""
    expected = {
        "Development": (UpdatePolicy.NO_THIRD_PARTY_APP_UPDATES, OsFeed.RETAIL),
        "Field Test": (UpdatePolicy.UPDATE_ALL, OsFeed.RETAIL),
        "Production": (UpdatePolicy.UPDATE_ALL, OsFeed.RETAIL),
        "Production OS Evaluation": (UpdatePolicy.UPDATE_ALL, OsFeed.RETAIL_EVAL),
        "Field Test OS Evaluation": (UpdatePolicy.UPDATE_ALL, OsFeed.RETAIL_EVAL),
    }
    assert {name: (group.update_policy, group.os_feed) for name, group in tenant.groups.items()} == expected
    for group in tenant.groups.values():
        assert (group.tenant_id, group.product_id, group.allow_crash_dumps) == (
            tenant.id,
            tenant.product.id,
            False,
        )
    listed = tenant.client.get_list(
        f"/v1/tenants/{tenant.id}/device-groups", schemas.DeviceGroupPublic, {"product": "panel-controller"}
    )
    assert sorted(group.id for group in listed) == sorted(group.id for group in tenant.groups.values())

    second = tenant.client.post(
        f"/v1/tenants/{tenant.id}/products", schemas.ProductCreate(name="inverter"), schemas.ProductCreated
    )
    assert sorted(group.name for group in second.device_groups) == sorted(expected)
    assert not {group.id for group in second.device_groups} & {group.id for group in tenant.groups.values()}
    duplicate = admin_http.post(f"/v1/tenants/{tenant.id}/products", json={"name": "inverter"})
    assert error_of(duplicate) == (409, "already_exists")
    described = tenant.client.patch(
        f"/v1/tenants/{tenant.id}/products/inverter",
        schemas.ProductUpdate(description="string inverter"),
        schemas.ProductPublic,
    )
    assert (described.id, described.description) == (second.product.id, "string inverter")


def test_a_device_group_is_created_updated_and_deleted_only_once_empty(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    groups = f"/v1/tenants/{tenant.id}/device-groups"
    pilot = tenant.client.post(
        groups,
        schemas.DeviceGroupCreate(
            product="panel-controller", name="Pilot", update_policy=UpdatePolicy.NO_UPDATES
        ),
        schemas.DeviceGroupPublic,
    )
    assert (pilot.product_id, pilot.update_policy, pilot.os_feed) == (
        tenant.product.id,
        UpdatePolicy.NO_UPDATES,
        OsFeed.RETAIL,
    )
    again = admin_http.post(groups, json={"product": tenant.product.id, "name": "Pilot"})
    assert error_of(again) == (409, "already_exists")
    unknown_product = admin_http.post(groups, json={"product": "no-such-product", "name": "X"})
    assert error_of(unknown_product) == (404, "product_not_found")

    updated = tenant.client.patch(
        f"{groups}/{pilot.id}",
        schemas.DeviceGroupUpdate(
            name="Pilot farms", os_feed=OsFeed.RETAIL_EVAL, update_policy=UpdatePolicy.UPDATE_ALL
        ),
        schemas.DeviceGroupPublic,
    )
    assert (updated.name, updated.os_feed, updated.update_policy) == (
        "Pilot farms",
        OsFeed.RETAIL_EVAL,
        UpdatePolicy.UPDATE_ALL,
    )
    assert tenant.client.get(f"{groups}/{pilot.id}", schemas.DeviceGroupPublic) == updated
    clash = admin_http.patch(f"{groups}/{pilot.id}", json={"name": "Production"})
    assert error_of(clash) == (409, "already_exists")
    bad_policy = admin_http.patch(f"{groups}/{pilot.id}", json={"update_policy": "Sometimes"})
    assert error_of(bad_policy) == (422, "invalid_input")

    device = SimulatedDevice("pilot-1", ())
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/claim",
        schemas.DeviceClaim(devices=[device.claim_item()], group_id=pilot.id),
        schemas.ClaimResponse,
    )
    assert error_of(admin_http.delete(f"{groups}/{pilot.id}")) == (409, "device_group_in_use")
    tenant.client.patch(
        f"/v1/tenants/{tenant.id}/devices/{device.device_id}",
        schemas.DeviceUpdate(group_id=tenant.groups["Production"].id),
        schemas.DevicePublic,
    )
    assert admin_http.delete(f"{groups}/{pilot.id}").status_code == 204
    assert error_of(admin_http.get(f"{groups}/{pilot.id}")) == (404, "device_group_not_found")
    codes = [event.code for event in tenant.events(kind="device_group")]
    assert codes == ["deleted", "updated", "created"]


def test_a_product_is_deleted_with_its_groups_only_once_no_device_belongs_to_it(
    tenant: TenantSetup, admin_http: httpx.Client, device: SimulatedDevice
) -> None:
    tenant.claim(device, group="Field Test")
    product_path = f"/v1/tenants/{tenant.id}/products/panel-controller"
    assert error_of(admin_http.delete(product_path)) == (409, "product_in_use")
    assert tenant.client.get(product_path, schemas.ProductPublic).id == tenant.product.id

    moved = tenant.client.patch(
        f"/v1/tenants/{tenant.id}/devices/{device.device_id}",
        schemas.DeviceUpdate(group_id=None),
        schemas.DevicePublic,
    )
    assert (moved.group_id, moved.product_id) == (None, None)
    assert admin_http.delete(f"/v1/tenants/{tenant.id}/products/{tenant.product.id}").status_code == 204
    assert error_of(admin_http.get(product_path)) == (404, "product_not_found")
    remaining = tenant.client.get_list(f"/v1/tenants/{tenant.id}/device-groups", schemas.DeviceGroupPublic)
    assert remaining == []
    assert [event.code for event in tenant.events(kind="product")] == ["deleted", "created"]


# ------------------------------------------------------------------ claims


def test_a_device_is_claimed_once_and_a_second_claim_says_so(
    tenant: TenantSetup, device: SimulatedDevice
) -> None:
    first = tenant.claim(device)
    assert (first.claimed, first.already_claimed, first.refused) == (1, 0, 0)
    again = tenant.claim(device, group="Production")
    assert (again.claimed, again.already_claimed, again.refused) == (0, 1, 0)
    assert again.results[0].outcome == "already_claimed"
    shown = tenant.client.get(f"/v1/tenants/{tenant.id}/devices/{device.device_id}", schemas.DevicePublic)
    assert shown.group_id == tenant.groups["Field Test"].id, "a repeated claim leaves the device as it is"
    assert shown.status == "active"
    assert shown.public_key_pem == device.claim_item().public_key
    assert [event.code for event in tenant.events(kind="claim")] == ["claimed"]


def test_a_device_claimed_by_another_tenant_is_refused_and_the_attempt_recorded(
    tenant: TenantSetup, team: Team, device: SimulatedDevice
) -> None:
    tenant.claim(device)
    rival = team.join("rival@example.com", can_create_tenants=True)
    lab = make_tenant(rival.client, "lab")
    answer = lab.claim(device)
    assert (answer.claimed, answer.refused) == (0, 1)
    assert (answer.results[0].outcome, answer.results[0].code) == ("refused", "claimed_elsewhere")

    [event] = lab.events(kind="claim")
    assert (event.code, event.severity, event.device_id, event.actor) == (
        "claimed_elsewhere",
        "warning",
        device.device_id,
        "rival@example.com",
    )
    assert error_of(rival.http.get(f"/v1/tenants/{lab.id}/devices/{device.device_id}")) == (
        404,
        "device_not_found",
    )
    owner = tenant.client.get(f"/v1/tenants/{tenant.id}/devices/{device.device_id}", schemas.DevicePublic)
    assert owner.tenant_id == tenant.id


def test_claims_with_a_bad_identity_are_refused_one_by_one_in_order(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    """The id must be the SHA-256 of a P-256 key; each bad item is refused, the good one still claimed."""
    good = SimulatedDevice("good", ())
    other = SimulatedDevice("other", ())
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    edwards = ed25519.Ed25519PrivateKey.generate().public_key()
    edwards_id = hashlib.sha256(
        edwards.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()
    good_pem = good.claim_item().public_key
    oversized = good_pem.replace("-----END", "A" * 1200 + "\n-----END")
    cases: list[tuple[str, str, str, str]] = [
        (other.device_id, good_pem, "invalid_identity", "not the SHA-256 of this public key"),
        (good.device_id.upper(), good_pem, "invalid_identity", "64 lower-case hexadecimal"),
        (good.device_id[:63], good_pem, "invalid_identity", "64 lower-case hexadecimal"),
        (device_id_for(p384), pem_of(p384), "invalid_identity", "must be an ECDSA P-256 key"),
        (edwards_id, pem_of(edwards), "invalid_identity", "must be an ECDSA P-256 key"),
        (
            good.device_id,
            "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
            "invalid_identity",
            "not a valid PEM",
        ),
        (good.device_id, oversized, "invalid_identity", "larger than any P-256 key"),
        (good.device_id, good_pem, "", ""),
        (good.device_id, good_pem, "duplicate", "named twice"),
    ]
    body = {"devices": [{"device_id": device_id, "public_key": key} for device_id, key, _, _ in cases]}
    response = admin_http.post(f"/v1/tenants/{tenant.id}/devices/claim", json=body)
    assert response.status_code == 200, response.text
    answer = schemas.ClaimResponse.model_validate_json(response.content)
    assert (answer.claimed, answer.already_claimed, answer.refused) == (1, 0, len(cases) - 1)
    for (_, _, code, message), result in zip(cases, answer.results, strict=True):
        if not code:
            assert result.outcome == "claimed"
            continue
        assert (result.outcome, result.code) == ("refused", code)
        assert message in (result.message or "")
    assert [item.id for item in devices_of(tenant)] == [good.device_id]


def test_a_bulk_claim_of_exactly_one_thousand_devices_is_one_request(tenant: TenantSetup) -> None:
    fleet = [SimulatedDevice(f"panel-{index:04}", ()) for index in range(1000)]
    answer = tenant.claim(*fleet, group="Production")
    assert (answer.claimed, answer.already_claimed, answer.refused) == (1000, 0, 0)
    assert [result.device_id for result in answer.results] == [device.device_id for device in fleet]
    listed = devices_of(tenant, group_id=tenant.groups["Production"].id, limit=1000)
    assert sorted(item.id for item in listed) == sorted(device.device_id for device in fleet)


def test_a_claim_of_one_thousand_and_one_devices_is_refused_by_the_schema(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    """The API schema bounds a claim at 1,000 devices (422) before the service's own bound is reached."""
    fleet = [SimulatedDevice(f"panel-{index:04}", ()) for index in range(1001)]
    response = admin_http.post(f"/v1/tenants/{tenant.id}/devices/claim", json=claim_body(*fleet))
    status, code = error_of(response)
    assert (status, code) == (422, "invalid_input")
    assert "devices" in response.json()["error"]["message"]
    assert devices_of(tenant) == []


class TestAServiceBulkLimitBelowTheSchema:
    """The service enforces its configured ``max_bulk_claim`` itself, as ``too_many_devices``."""

    @pytest.fixture
    def limits(self) -> Limits:
        return Limits(max_bulk_claim=2)

    def test_a_claim_over_the_configured_limit_is_refused_whole(
        self, tenant: TenantSetup, admin_http: httpx.Client
    ) -> None:
        fleet = [SimulatedDevice(f"panel-{index}", ()) for index in range(3)]
        over = admin_http.post(f"/v1/tenants/{tenant.id}/devices/claim", json=claim_body(*fleet))
        assert error_of(over) == (400, "too_many_devices")
        assert devices_of(tenant) == []
        assert tenant.claim(*fleet[:2]).claimed == 2


# ------------------------------------------------------------------ devices


def test_a_device_moves_between_groups_and_so_between_products(
    tenant: TenantSetup, admin_http: httpx.Client, device: SimulatedDevice
) -> None:
    tenant.claim(device, group="Field Test")
    path = f"/v1/tenants/{tenant.id}/devices/{device.device_id}"
    production = tenant.groups["Production"]
    moved = tenant.client.patch(path, schemas.DeviceUpdate(group_id=production.id), schemas.DevicePublic)
    assert (moved.group_id, moved.product_id) == (production.id, tenant.product.id)

    inverter = tenant.client.post(
        f"/v1/tenants/{tenant.id}/products", schemas.ProductCreate(name="inverter"), schemas.ProductCreated
    )
    development = next(group for group in inverter.device_groups if group.name == "Development")
    moved = tenant.client.patch(path, schemas.DeviceUpdate(group_id=development.id), schemas.DevicePublic)
    assert (moved.group_id, moved.product_id) == (development.id, inverter.product.id)

    assert error_of(admin_http.patch(path, json={"group_id": "no-such-group"})) == (
        404,
        "device_group_not_found",
    )
    assert tenant.client.get(path, schemas.DevicePublic).group_id == development.id
    assert error_of(
        admin_http.patch(f"/v1/tenants/{tenant.id}/devices/{'0' * 64}", json={"group_id": None})
    ) == (
        404,
        "device_not_found",
    )
    assert [event.code for event in tenant.events(kind="device")] == ["moved", "moved"]


def test_devices_list_by_group_product_and_status_and_page(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    field = [SimulatedDevice(f"field-{index}", ()) for index in range(2)]
    production = SimulatedDevice("production", ())
    tenant.claim(*field, group="Field Test")
    tenant.claim(production, group="Production")
    inverter = tenant.client.post(
        f"/v1/tenants/{tenant.id}/products", schemas.ProductCreate(name="inverter"), schemas.ProductCreated
    )
    loose = SimulatedDevice("inverter", ())
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/claim",
        schemas.DeviceClaim(devices=[loose.claim_item()], group_id=inverter.device_groups[0].id),
        schemas.ClaimResponse,
    )
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/{production.device_id}/revoke",
        schemas.Revoke(),
        schemas.RevokedDevice,
    )

    def ids(**params: str | int) -> set[str]:
        return {item.id for item in devices_of(tenant, **params)}

    everyone = {device.device_id for device in (*field, production, loose)}
    assert ids() == everyone
    assert ids(group_id=tenant.groups["Field Test"].id) == {device.device_id for device in field}
    assert ids(product="panel-controller") == {device.device_id for device in (*field, production)}
    assert ids(product=inverter.product.id) == {loose.device_id}
    assert ids(status="revoked") == {production.device_id}
    assert ids(status="active") == everyone - {production.device_id}
    first, rest = ids(limit=2), ids(limit=2, offset=2)
    assert len(first) == len(rest) == 2
    assert first | rest == everyone
    assert error_of(admin_http.get(f"/v1/tenants/{tenant.id}/devices", params={"product": "nope"})) == (
        404,
        "product_not_found",
    )
    assert error_of(admin_http.get(f"/v1/tenants/{tenant.id}/devices", params={"status": "lost"}))[0] == 422
    assert error_of(admin_http.get(f"/v1/tenants/{tenant.id}/devices", params={"limit": 1001}))[0] == 422


def test_operator_actions_are_recorded_as_events_with_their_actor(
    tenant: TenantSetup, team: Team, device: SimulatedDevice
) -> None:
    tenant.claim(device)
    tenant.client.patch(
        f"/v1/tenants/{tenant.id}/devices/{device.device_id}",
        schemas.DeviceUpdate(group_id=tenant.groups["Production"].id),
        schemas.DevicePublic,
    )
    team.join("reader@example.com", role=Role.READER, tenant_id=tenant.id)
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/{device.device_id}/revoke", schemas.Revoke(), schemas.RevokedDevice
    )
    events = tenant.events()
    ids = [event.id or 0 for event in events]
    assert ids == sorted(ids, reverse=True), "newest first"
    by_admin = {(event.kind, event.code) for event in events if event.actor == ADMIN_EMAIL}
    assert {
        ("tenant", "created"),
        ("product", "created"),
        ("reference_value", "added"),
        ("claim", "claimed"),
        ("device", "moved"),
        ("role", "assigned"),
        ("revocation", "device_revoked"),
    } <= by_admin
    assert all(event.tenant_id == tenant.id for event in events)
    about_device = tenant.events(device_id=device.device_id)
    assert [event.code for event in about_device] == ["device_revoked", "moved", "claimed"]


# ------------------------------------------------------------------ roles


def test_a_reader_reads_but_every_write_is_refused_by_the_role(
    tenant: TenantSetup, team: Team, device: SimulatedDevice
) -> None:
    tenant.claim(device)
    reader = team.join("reader@example.com", role=Role.READER, tenant_id=tenant.id)
    base = f"/v1/tenants/{tenant.id}"
    for path in (
        base,
        f"{base}/products",
        f"{base}/device-groups",
        f"{base}/devices",
        f"{base}/devices/{device.device_id}",
        f"{base}/events",
        f"{base}/certificates",
        f"{base}/ca/chain",
        f"{base}/reference-values",
        f"{base}/roles",
    ):
        assert reader.http.get(path).status_code == 200, path
    group = tenant.groups["Field Test"].id
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", f"{base}/products", {"name": "inverter"}),
        ("PATCH", f"{base}/products/{tenant.product.id}", {"description": "changed"}),
        ("POST", f"{base}/devices/claim", claim_body(SimulatedDevice("new", ()))),
        ("POST", f"{base}/devices/{device.device_id}/revoke", {}),
        ("PATCH", f"{base}/devices/{device.device_id}", {"group_id": None}),
        ("POST", f"{base}/device-groups", {"product": tenant.product.id, "name": "Pilot"}),
        ("PATCH", f"{base}/device-groups/{group}", {"name": "Renamed"}),
        (
            "POST",
            f"{base}/reference-values",
            {"values": [{"component": "a", "version": "1.0.0", "sha256": "0" * 64}]},
        ),
        ("PUT", f"{base}/security-floors/fleetward-agent", {"minimum_version": "1.0.0"}),
        ("POST", f"{base}/certificates/01/revoke", {}),
        ("PUT", f"{base}/roles", {"email": reader.email, "role": "Administrator"}),
        ("POST", f"{base}/ca/proof-of-possession", {"verification_code": "ABC123"}),
        ("DELETE", f"{base}/products/{tenant.product.id}", None),
        ("DELETE", f"{base}/device-groups/{group}", None),
    ]
    for method, path, body in writes:
        response = reader.http.request(method, path, json=body)
        assert error_of(response) == (403, "role_forbids"), (method, path)
    assert len(devices_of(tenant)) == 1
    assert devices_of(tenant)[0].status == "active"


def test_a_contributor_writes_but_every_delete_and_administration_is_refused(
    tenant: TenantSetup, team: Team, device: SimulatedDevice
) -> None:
    contributor = team.join("contributor@example.com", role=Role.CONTRIBUTOR, tenant_id=tenant.id)
    team.join("reader@example.com", role=Role.READER, tenant_id=tenant.id)
    base = f"/v1/tenants/{tenant.id}"
    http = contributor.http
    assert http.post(f"{base}/products", json={"name": "inverter"}).status_code == 201
    claimed = http.post(
        f"{base}/devices/claim", json=claim_body(device, group_id=tenant.groups["Field Test"].id)
    )
    assert claimed.json()["claimed"] == 1
    pilot = http.post(f"{base}/device-groups", json={"product": "inverter", "name": "Pilot"})
    assert pilot.status_code == 201
    value = {"component": "inverter-fw", "version": "3.0.0", "sha256": "a" * 64}
    assert http.post(f"{base}/reference-values", json={"values": [value]}).json() == {"added": 1}
    assert (
        http.put(f"{base}/security-floors/inverter-fw", json={"minimum_version": "2.0.0"}).status_code == 200
    )
    assert http.post(f"{base}/devices/{device.device_id}/revoke", json={}).json()["certificates_revoked"] == 0

    refused: list[tuple[str, str, dict[str, Any] | None]] = [
        ("DELETE", f"{base}/products/inverter", None),
        ("DELETE", f"{base}/device-groups/{pilot.json()['id']}", None),
        ("DELETE", f"{base}/reference-values/inverter-fw/3.0.0/{'a' * 64}", None),
        ("DELETE", f"{base}/roles/reader@example.com", None),
        ("PUT", f"{base}/roles", {"email": "reader@example.com", "role": "Contributor"}),
        ("POST", f"{base}/ca/proof-of-possession", {"verification_code": "ABC123"}),
    ]
    for method, path, body in refused:
        assert error_of(http.request(method, path, json=body)) == (403, "role_forbids"), (method, path)
    assert error_of(http.post("/v1/tenants", json={"name": "mine"})) == (403, "cannot_create_tenants")
    assert error_of(http.get("/v1/operators")) == (403, "cannot_create_tenants")
    assert error_of(http.post("/v1/operators", json={"email": "x@example.com", "name": "X"})) == (
        403,
        "cannot_create_tenants",
    )


def test_an_administrator_may_delete_and_administer(
    tenant: TenantSetup, team: Team, admin_http: httpx.Client
) -> None:
    second = team.join("second@example.com", role=Role.ADMINISTRATOR, tenant_id=tenant.id)
    team.join("contributor@example.com", role=Role.CONTRIBUTOR, tenant_id=tenant.id)
    base = f"/v1/tenants/{tenant.id}"
    http = second.http
    value = {"component": "inverter-fw", "version": "3.0.0", "sha256": "a" * 64}
    http.post(f"{base}/reference-values", json={"values": [value]}).raise_for_status()
    pilot = http.post(f"{base}/device-groups", json={"product": tenant.product.id, "name": "Pilot"}).json()
    for path in (
        f"{base}/device-groups/{pilot['id']}",
        f"{base}/reference-values/inverter-fw/3.0.0/{'a' * 64}",
        f"{base}/roles/contributor@example.com",
        f"{base}/products/{tenant.product.id}",
    ):
        assert http.delete(path).status_code == 204, path
    promoted = http.put(f"{base}/roles", json={"email": ADMIN_EMAIL, "role": "Reader"})
    assert promoted.json()["role"] == "Reader"
    roles = {item.email: item.role for item in second.client.get_list(f"{base}/roles", schemas.RolePublic)}
    assert roles == {ADMIN_EMAIL: Role.READER, "second@example.com": Role.ADMINISTRATOR}
    assert error_of(admin_http.delete(f"{base}/roles/second@example.com")) == (403, "role_forbids")


def test_the_last_administrator_can_be_neither_removed_nor_demoted(
    tenant: TenantSetup, team: Team, admin_http: httpx.Client
) -> None:
    base = f"/v1/tenants/{tenant.id}"
    for role in ("Contributor", "Reader"):
        demote = admin_http.put(f"{base}/roles", json={"email": ADMIN_EMAIL, "role": role})
        assert error_of(demote) == (409, "last_administrator")
    assert error_of(admin_http.delete(f"{base}/roles/{ADMIN_EMAIL}")) == (409, "last_administrator")

    second = team.join("second@example.com", role=Role.ADMINISTRATOR, tenant_id=tenant.id)
    assert (
        admin_http.put(f"{base}/roles", json={"email": ADMIN_EMAIL, "role": "Contributor"}).status_code == 200
    )
    assert error_of(second.http.delete(f"{base}/roles/second@example.com")) == (409, "last_administrator")
    assert error_of(second.http.put(f"{base}/roles", json={"email": second.email, "role": "Reader"})) == (
        409,
        "last_administrator",
    )
    assert error_of(second.http.delete(f"{base}/roles/nobody@example.com")) == (404, "role_not_found")
    assert error_of(
        second.http.put(f"{base}/roles", json={"email": "nobody@example.com", "role": "Reader"})
    ) == (
        404,
        "operator_not_found",
    )


# ------------------------------------------------------------------ tokens


def test_a_read_only_token_reads_and_cannot_write_or_mint_a_broader_token(
    tenant: TenantSetup, admin: FleetwardClient, server: BackgroundServer
) -> None:
    created = admin.post(
        "/v1/tokens", schemas.TokenCreate(name="dashboard", scopes=["read"]), schemas.TokenCreated
    )
    assert created.token.scopes == ["read"]
    assert created.secret.startswith(f"fwt_{created.token.id}_")
    base = f"/v1/tenants/{tenant.id}"
    with httpx.Client(base_url=server.url, headers=bearer(created.secret)) as http:
        assert http.get(f"{base}/devices").status_code == 200
        assert http.get("/v1/me").json()["scopes"] == ["read"]
        for method, path, body in (
            ("POST", f"{base}/products", {"name": "inverter"}),
            ("POST", f"{base}/devices/claim", claim_body(SimulatedDevice("x", ()))),
            ("DELETE", f"{base}/products/{tenant.product.id}", None),
        ):
            assert error_of(http.request(method, path, json=body)) == (403, "token_scope_missing"), path
        assert error_of(http.post("/v1/tenants", json={"name": "other"})) == (403, "token_scope_missing")
        broader = http.post("/v1/tokens", json={"name": "wider", "scopes": ["read", "write"]})
        assert error_of(broader) == (400, "scope_escalation")
        assert http.post("/v1/tokens", json={"name": "same", "scopes": ["read"]}).status_code == 201
        unknown = http.post("/v1/tokens", json={"name": "odd", "scopes": ["root"]})
        assert error_of(unknown) == (400, "invalid_scope")


def test_a_tenant_restricted_token_acts_in_its_tenant_only(
    tenant: TenantSetup, admin: FleetwardClient, admin_http: httpx.Client, server: BackgroundServer
) -> None:
    lab = make_tenant(admin, "lab")
    created = admin.post(
        "/v1/tokens",
        schemas.TokenCreate(
            name="farm only", tenant_id=tenant.id, scopes=["read", "write", "delete", "admin"]
        ),
        schemas.TokenCreated,
    )
    with httpx.Client(base_url=server.url, headers=bearer(created.secret)) as http:
        assert http.get(f"/v1/tenants/{tenant.id}/devices").status_code == 200
        assert http.post(f"/v1/tenants/{tenant.id}/products", json={"name": "inverter"}).status_code == 201
        assert error_of(http.get(f"/v1/tenants/{lab.id}/devices")) == (403, "token_wrong_tenant")
        assert error_of(http.post(f"/v1/tenants/{lab.id}/products", json={"name": "x"})) == (
            403,
            "token_wrong_tenant",
        )
        assert [item["id"] for item in http.get("/v1/tenants").json()] == [tenant.id]
        assert http.get("/v1/me").json()["token_tenant_id"] == tenant.id
        unrestricted = http.post("/v1/tokens", json={"name": "any", "scopes": ["read"]})
        assert error_of(unrestricted) == (400, "scope_escalation")
        elsewhere = http.post("/v1/tokens", json={"name": "lab", "tenant_id": lab.id, "scopes": ["read"]})
        assert error_of(elsewhere) == (400, "scope_escalation")
        assert error_of(http.post("/v1/tenants", json={"name": "third"})) == (403, "token_scope_missing")
    assert sorted(item["name"] for item in admin_http.get("/v1/tenants").json()) == ["lab", "solar-farm"]


def test_a_token_cannot_mint_a_token_that_outlives_it(
    admin: FleetwardClient, server: BackgroundServer
) -> None:
    """Asked for longer, it is refused; by default the new token expires with the one that made it."""
    short = admin.post(
        "/v1/tokens", schemas.TokenCreate(name="short", scopes=["read"], valid_days=2), schemas.TokenCreated
    )
    with httpx.Client(base_url=server.url, headers=bearer(short.secret)) as http:
        longer = http.post("/v1/tokens", json={"name": "longer", "scopes": ["read"], "valid_days": 30})
        assert error_of(longer) == (400, "scope_escalation")
        by_default = http.post("/v1/tokens", json={"name": "default", "scopes": ["read"]})
        assert by_default.status_code == 201
        expires = schemas.TokenCreated.model_validate_json(by_default.content).token.expires_at
        assert expires == short.token.expires_at
        assert (
            http.post("/v1/tokens", json={"name": "day", "scopes": ["read"], "valid_days": 1}).status_code
            == 201
        )


def test_a_token_cannot_be_made_for_a_tenant_its_operator_has_no_role_in(
    tenant: TenantSetup, team: Team
) -> None:
    stranger = team.join("stranger@example.com")
    response = stranger.http.post(
        "/v1/tokens", json={"name": "x", "tenant_id": tenant.id, "scopes": ["read"]}
    )
    assert error_of(response) == (403, "no_role_in_tenant")


def test_a_revoked_token_is_refused_with_401(
    admin: FleetwardClient, admin_http: httpx.Client, anonymous: httpx.Client, team: Team
) -> None:
    created = admin.post("/v1/tokens", schemas.TokenCreate(name="ci", scopes=["read"]), schemas.TokenCreated)
    assert anonymous.get("/v1/me", headers=bearer(created.secret)).status_code == 200
    other = team.join("other@example.com")
    assert error_of(other.http.delete(f"/v1/tokens/{created.token.id}")) == (404, "token_not_found")
    assert admin_http.delete(f"/v1/tokens/{created.token.id}").status_code == 204
    refused = anonymous.get("/v1/me", headers=bearer(created.secret))
    assert error_of(refused) == (401, "token_revoked")
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert error_of(admin_http.delete(f"/v1/tokens/{created.token.id}")) == (404, "token_not_found")
    listed = {item.id: item for item in admin.get_list("/v1/tokens", schemas.TokenPublic)}
    assert listed[created.token.id].revoked_at is not None
    assert created.secret not in admin_http.get("/v1/tokens").text


def test_a_token_revokes_itself_but_only_an_admin_token_revokes_the_others(
    admin: FleetwardClient, admin_http: httpx.Client, anonymous: httpx.Client
) -> None:
    """A leaked read-only token must not be able to lock its operator out by revoking the rest."""
    reader = admin.post("/v1/tokens", schemas.TokenCreate(name="ro", scopes=["read"]), schemas.TokenCreated)
    spare = admin.post("/v1/tokens", schemas.TokenCreate(name="spare", scopes=["read"]), schemas.TokenCreated)
    as_reader = bearer(reader.secret)
    refused = anonymous.delete(f"/v1/tokens/{spare.token.id}", headers=as_reader)
    assert error_of(refused) == (403, "token_scope_missing")
    assert anonymous.get("/v1/me", headers=bearer(spare.secret)).status_code == 200
    assert anonymous.delete(f"/v1/tokens/{reader.token.id}", headers=as_reader).status_code == 204
    assert error_of(anonymous.get("/v1/me", headers=as_reader)) == (401, "token_revoked")
    assert admin_http.delete(f"/v1/tokens/{spare.token.id}").status_code == 204


def test_an_operator_whose_tokens_ran_out_is_given_a_new_one_by_a_platform_operator(
    admin: FleetwardClient, admin_http: httpx.Client, anonymous: httpx.Client, team: Team, tenant: TenantSetup
) -> None:
    member = team.join("field@example.com", role=Role.CONTRIBUTOR, tenant_id=tenant.id)
    body = {"name": "replacement", "scopes": ["read", "write"], "valid_days": 30}
    refused = member.http.post("/v1/operators/admin@example.com/tokens", json=body)
    assert error_of(refused) == (403, "cannot_create_tenants")
    issued = admin_http.post(f"/v1/operators/{member.email}/tokens", json=body)
    assert issued.status_code == 201, issued.text
    me = anonymous.get("/v1/me", headers=bearer(issued.json()["secret"])).json()
    assert me["email"] == member.email
    assert me["scopes"] == ["read", "write"]
    unknown = admin_http.post("/v1/operators/nobody@example.com/tokens", json=body)
    assert error_of(unknown) == (404, "operator_not_found")
    events = admin.get_list("/v1/events", schemas.EventPublic, {"kind": "token"})
    assert any(member.email in event.detail and event.actor == "admin@example.com" for event in events)


def test_events_of_no_tenant_are_listed_for_platform_operators_only(
    admin: FleetwardClient, server: BackgroundServer, team: Team, tenant: TenantSetup
) -> None:
    stranger = SimulatedDevice("stranger", healthy_software())
    with pytest.raises(AttestationRefused):
        enroll(server, stranger)
    platform = admin.get_list("/v1/events", schemas.EventPublic, {"kind": "attestation"})
    assert [(event.code, event.device_id) for event in platform] == [("device_unclaimed", stranger.device_id)]
    assert any(event.kind == "operator" for event in admin.get_list("/v1/events", schemas.EventPublic))
    member = team.join("reader@example.com", role=Role.READER, tenant_id=tenant.id)
    assert error_of(member.http.get("/v1/events")) == (403, "cannot_create_tenants")


def test_tenant_names_are_unique_per_operator_and_reveal_nothing_of_other_tenants(
    admin: FleetwardClient, admin_http: httpx.Client, team: Team
) -> None:
    admin.post("/v1/tenants", schemas.TenantCreate(name="greenhouse"), schemas.TenantPublic)
    again = admin_http.post("/v1/tenants", json={"name": "greenhouse"})
    assert error_of(again) == (409, "tenant_exists")
    other = team.join("other@example.com", can_create_tenants=True)
    theirs = other.client.post("/v1/tenants", schemas.TenantCreate(name="greenhouse"), schemas.TenantPublic)
    assert [tenant.id for tenant in other.client.get_list("/v1/tenants", schemas.TenantPublic)] == [theirs.id]


def test_a_token_expires_after_its_validity(
    admin: FleetwardClient, anonymous: httpx.Client, admin_http: httpx.Client, clock: FakeClock
) -> None:
    created = admin.post(
        "/v1/tokens", schemas.TokenCreate(name="day", scopes=["read"], valid_days=1), schemas.TokenCreated
    )
    assert created.token.expires_at == clock.now() + dt.timedelta(days=1)
    clock.advance(24 * 3600 - 1)
    assert anonymous.get("/v1/me", headers=bearer(created.secret)).status_code == 200
    clock.advance(1)
    assert error_of(anonymous.get("/v1/me", headers=bearer(created.secret))) == (401, "token_expired")
    too_long = admin_http.post("/v1/tokens", json={"name": "long", "scopes": ["read"], "valid_days": 366})
    assert error_of(too_long) == (400, "invalid_input")


def test_a_missing_or_malformed_token_is_refused_with_401(anonymous: httpx.Client, admin_token: str) -> None:
    token_id = admin_token.split("_")[1]
    wrong_secret = f"fwt_{token_id}_{'A' * 43}"
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "token_missing"),
        ({"Authorization": "Bearer"}, "token_malformed"),
        ({"Authorization": f"Basic {admin_token}"}, "token_malformed"),
        ({"Authorization": "Bearer not-a-token"}, "token_malformed"),
        ({"Authorization": f"Bearer {admin_token}x"}, "token_malformed"),
        ({"Authorization": f"Bearer fwt_{'0' * 16}_{'A' * 43}"}, "token_invalid"),
        ({"Authorization": f"Bearer {wrong_secret}"}, "token_invalid"),
        ({"Authorization": f"Bearer {'A' * 300}"}, "token_malformed"),
    ]
    for headers, code in cases:
        response = anonymous.get("/v1/me", headers=headers)
        assert error_of(response) == (401, code), headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert anonymous.get("/v1/me", headers={"Authorization": f"bearer {admin_token}"}).status_code == 200


# ------------------------------------------------------------------ tenant isolation


def test_an_operator_of_another_tenant_sees_and_touches_nothing_of_this_one(
    server: BackgroundServer,
    tenant: TenantSetup,
    team: Team,
    admin_http: httpx.Client,
    device: SimulatedDevice,
) -> None:
    tenant.claim(device)
    serial = enroll(server, device).issued.serial
    bob = team.join("bob@example.com", can_create_tenants=True)
    lab = make_tenant(bob.client, "lab")
    farm, mine = f"/v1/tenants/{tenant.id}", f"/v1/tenants/{lab.id}"

    for path in (
        farm,
        f"{farm}/devices",
        f"{farm}/devices/{device.device_id}",
        f"{farm}/certificates",
        f"{farm}/certificates/{serial}",
        f"{farm}/events",
        f"{farm}/ca/chain",
        f"{farm}/ca/certificates",
        f"{farm}/products",
        f"{farm}/device-groups",
        f"{farm}/reference-values",
        f"{farm}/security-floors",
        f"{farm}/roles",
    ):
        assert error_of(bob.http.get(path)) == (403, "no_role_in_tenant"), path
    for path, body in (
        (f"{farm}/devices/{device.device_id}/revoke", {}),
        (f"{farm}/certificates/{serial}/revoke", {}),
        (f"{farm}/devices/claim", claim_body(SimulatedDevice("intruder", ()))),
        (f"{farm}/ca/proof-of-possession", {"verification_code": "ABC123"}),
    ):
        assert error_of(bob.http.post(path, json=body)) == (403, "no_role_in_tenant"), path
    assert error_of(bob.http.put(f"{farm}/roles", json={"email": bob.email, "role": "Administrator"})) == (
        403,
        "no_role_in_tenant",
    )

    # Through his own tenant, the ids of the other tenant name nothing.
    assert error_of(bob.http.get(f"{mine}/devices/{device.device_id}")) == (404, "device_not_found")
    assert error_of(bob.http.get(f"{mine}/certificates/{serial}")) == (404, "certificate_not_found")
    assert error_of(bob.http.post(f"{mine}/certificates/{serial}/revoke", json={})) == (
        404,
        "certificate_not_found",
    )
    assert error_of(bob.http.post(f"{mine}/devices/{device.device_id}/revoke", json={})) == (
        404,
        "device_not_found",
    )
    farm_group = tenant.groups["Production"].id
    assert error_of(bob.http.get(f"{mine}/device-groups/{farm_group}")) == (404, "device_group_not_found")
    into_farm_group = bob.http.post(
        f"{mine}/devices/claim", json=claim_body(SimulatedDevice("new", ()), group_id=farm_group)
    )
    assert error_of(into_farm_group) == (404, "device_group_not_found")
    assert bob.http.get(f"{mine}/devices").json() == []
    assert bob.http.get(f"{mine}/certificates").json() == []
    assert all(event["device_id"] != device.device_id for event in bob.http.get(f"{mine}/events").json())
    assert bob.http.get(f"{mine}/ca/chain").text != admin_http.get(f"{farm}/ca/chain").text

    assert [item["name"] for item in bob.http.get("/v1/tenants").json()] == ["lab"]
    assert [item["name"] for item in admin_http.get("/v1/tenants").json()] == ["solar-farm"]
    assert [item["email"] for item in bob.http.get(f"{mine}/roles").json()] == [bob.email]
    assert devices_of(tenant)[0].status == "active"
    assert tenant.certificates()[0].revoked_at is None


# ------------------------------------------------------------------ secrets at rest


MASTER_KEY = bytes(range(32))

#: PrivateKeyInfo (PKCS#8) opens with version 0 then the id-ecPublicKey algorithm; a public key never does.
PKCS8_EC_MARKER = bytes.fromhex("020100301306072a8648ce3d0201")


def services_with_known_key(
    database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits
) -> Iterator[Services]:
    """The conftest's services, but sealing under a master key the test knows."""
    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        limits=limits,
    )
    built = build_services(settings, clock=clock, keystore=MasterKeyStore(MASTER_KEY))
    yield built
    built.close()


def ca_keys(services: Services, tenant_id: str) -> list[tuple[Any, ec.EllipticCurvePrivateKey]]:
    """Each CA row of the tenant with the key it unseals to.

    The label ``tenant:<tenant id>:ca:<ca id>`` is part of the stored format: changing it would leave
    every existing sealed key unopenable.
    """
    with services.database.read() as connection:
        rows = connection.execute(
            sa.select(certificate_authorities).where(certificate_authorities.c.tenant_id == tenant_id)
        ).all()
    store = MasterKeyStore(MASTER_KEY)
    return [(row, store.unseal(row.sealed_key, f"tenant:{tenant_id}:ca:{row.id}")) for row in rows]


def private_forms(key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    """The private key as PKCS#8 DER and as its raw scalar: neither may be stored."""
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [pkcs8, key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")]


def all_values(services: Services) -> Iterator[tuple[str, object]]:
    """Every stored value as ("table.column", value), read raw from the store."""
    with services.database.read() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(sa.select(table)).mappings():
                for column, value in row.items():
                    yield f"{table.name}.{column}", value


def contains(value: object, needle: bytes) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return needle in bytes(value)
    return needle.decode("latin-1") in str(value)


class TestSecretsAtRest:
    """Token secrets are stored only as hashes; CA private keys only sealed under the master key.

    The store is built with a master key the test knows, to prove that what is sealed really is the
    CA's key (and so that its absence in the clear means something).
    """

    @pytest.fixture
    def services(
        self, database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits
    ) -> Iterator[Services]:
        yield from services_with_known_key(database_url, tmp_path, clock, limits)

    def test_the_store_holds_no_token_secret(
        self, services: Services, admin: FleetwardClient, admin_token: str
    ) -> None:
        created = admin.post(
            "/v1/tokens", schemas.TokenCreate(name="ci", scopes=["read"]), schemas.TokenCreated
        )
        with services.database.read() as connection:
            rows = connection.execute(sa.select(api_tokens)).mappings().all()
        assert len(rows) == 2
        for row in rows:
            assert re.fullmatch("[0-9a-f]{64}", row["secret_sha256"])
        for token in (admin_token, created.secret):
            secret = token.split("_", 2)[2].encode()
            assert len(secret) == 43
            for where, value in all_values(services):
                assert not contains(value, secret), f"{where} holds a token secret"

    def test_ca_private_keys_are_sealed_and_nowhere_in_the_clear(
        self, services: Services, tenant: TenantSetup
    ) -> None:
        keys = ca_keys(services, tenant.id)
        assert sorted(row.kind for row, _ in keys) == ["issuing", "root"]
        for row, key in keys:
            certificate = x509.load_der_x509_certificate(row.certificate)
            assert key.public_key() == certificate.public_key(), "the sealed key is the CA's own key"
            sealed = bytes(row.sealed_key)
            assert sealed.startswith(b"fwk1")
            for candidate in (sealed, sealed[4:], sealed[16:]):
                with pytest.raises(ValueError, match="Could not deserialize key data"):
                    serialization.load_der_private_key(candidate, password=None)
            for where, value in all_values(services):
                for needle in (*private_forms(key), PKCS8_EC_MARKER, b"PRIVATE KEY"):
                    assert not contains(value, needle), f"{where} holds a private key in the clear"

    def test_a_sealed_key_opens_with_neither_another_master_key_nor_another_label(
        self, services: Services, tenant: TenantSetup, admin: FleetwardClient
    ) -> None:
        lab = make_tenant(admin, "lab")
        (issuing_row, _), (root_row, _) = sorted(ca_keys(services, tenant.id), key=lambda item: item[0].kind)
        lab_row = ca_keys(services, lab.id)[0][0]
        label = f"tenant:{tenant.id}:ca:{root_row.id}"
        stranger = MasterKeyStore(secrets.token_bytes(32))
        with pytest.raises(ConfigurationError, match="does not open with this master key"):
            stranger.unseal(root_row.sealed_key, label)
        ours = MasterKeyStore(MASTER_KEY)
        for wrong_label in (
            f"tenant:{tenant.id}:ca:{issuing_row.id}",  # another row of the same tenant
            f"tenant:{lab.id}:ca:{root_row.id}",  # the same row claimed by another tenant
            f"tenant:{lab.id}:ca:{lab_row.id}",  # a row of another tenant
        ):
            with pytest.raises(ConfigurationError, match="does not open"):
                ours.unseal(root_row.sealed_key, wrong_label)
        tampered = bytearray(root_row.sealed_key)
        tampered[-1] ^= 1
        with pytest.raises(ConfigurationError, match="does not open"):
            ours.unseal(bytes(tampered), label)
        with pytest.raises(ConfigurationError, match="not in a format"):
            ours.unseal(b"fwk0" + bytes(root_row.sealed_key)[4:], label)
        ours.unseal(root_row.sealed_key, label)


class TestTheEmbeddedStoreFile:
    """Byte for byte, the SQLite files (database, WAL) hold no private key and no token secret."""

    @pytest.fixture
    def database_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'fleetward.db'}"

    @pytest.fixture
    def services(
        self, database_url: str, tmp_path: Path, clock: FakeClock, limits: Limits
    ) -> Iterator[Services]:
        yield from services_with_known_key(database_url, tmp_path, clock, limits)

    def test_the_sqlite_files_hold_no_private_key_and_no_token_secret(
        self, services: Services, server: BackgroundServer, tenant: TenantSetup, admin_token: str
    ) -> None:
        device = SimulatedDevice("panel", healthy_software())
        tenant.claim(device)
        enroll(server, device)
        needles = [b"PRIVATE KEY", PKCS8_EC_MARKER, admin_token.split("_", 2)[2].encode()]
        for _, key in ca_keys(services, tenant.id):
            needles.extend(private_forms(key))
        database = Path(services.database.url.database or "")
        files = sorted(database.parent.glob(database.name + "*"))
        assert database in files
        for path in files:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{path.name} holds {needle[:16]!r}…"


# ------------------------------------------------------------------ the tenant CA


def chain_of(tenant: TenantSetup) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(tenant.client.get_bytes(f"/v1/tenants/{tenant.id}/ca/chain"))


def test_the_ca_chain_is_the_issuing_ca_then_its_root(tenant: TenantSetup) -> None:
    issuing, root = chain_of(tenant)
    issuing.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert issuing.subject != root.subject
    for certificate in (issuing, root):
        assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    listed = tenant.client.get_list(f"/v1/tenants/{tenant.id}/ca/certificates", schemas.CaCertificatePublic)
    assert sorted((item.kind, item.active) for item in listed) == [("issuing", True), ("root", True)]


def test_a_proof_of_possession_has_the_code_as_cn_and_is_signed_by_the_chosen_ca(tenant: TenantSetup) -> None:
    issuing, root = chain_of(tenant)
    for kind, signer, other in (("root", root, issuing), ("issuing", issuing, root)):
        pem = tenant.client.post_bytes(
            f"/v1/tenants/{tenant.id}/ca/proof-of-possession",
            schemas.ProofOfPossessionCreate.model_validate({"verification_code": "0A1B2C3D4E5F", "ca": kind}),
        )
        proof = x509.load_pem_x509_certificate(pem)
        assert proof.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "0A1B2C3D4E5F"
        proof.verify_directly_issued_by(signer)
        with pytest.raises((ValueError, TypeError)):
            proof.verify_directly_issued_by(other)
        assert proof.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    proofs = [event for event in tenant.events(kind="authority") if event.code == "proof_of_possession"]
    assert [event.actor for event in proofs] == [ADMIN_EMAIL, ADMIN_EMAIL]


def test_a_verification_code_that_is_not_letters_and_digits_is_refused(
    tenant: TenantSetup, admin_http: httpx.Client
) -> None:
    path = f"/v1/tenants/{tenant.id}/ca/proof-of-possession"
    for code in ("has space", "semi;colon", "CN=evil,O=x", "   "):
        assert error_of(admin_http.post(path, json={"verification_code": code})) == (400, "invalid_input"), (
            code
        )
    for code in ("", "A" * 65):
        assert error_of(admin_http.post(path, json={"verification_code": code})) == (422, "invalid_input"), (
            code
        )
    assert error_of(admin_http.post(path, json={"verification_code": "ABC", "ca": "device"}))[0] == 422


def test_crls_are_public_der_signed_by_their_ca(tenant: TenantSetup, anonymous: httpx.Client) -> None:
    issuing, root = chain_of(tenant)
    for path, signer in (("crl", issuing), ("crl/root", root)):
        response = anonymous.get(f"/v1/tenants/{tenant.id}/{path}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/pkix-crl"
        crl = x509.load_der_x509_crl(response.content)
        assert crl.issuer == signer.subject
        public_key = signer.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert crl.is_signature_valid(public_key)
        assert len(crl) == 0
    assert error_of(anonymous.get("/v1/tenants/no-such-tenant/crl")) == (404, "crl_not_found")
    assert error_of(anonymous.get("/v1/tenants/no-such-tenant/crl/root")) == (404, "crl_not_found")
