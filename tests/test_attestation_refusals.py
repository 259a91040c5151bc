"""Each bad input on the attestation path is refused with its own code, earns no certificate, and is recorded.

Each case goes through the real HTTP server to ``POST /v1/attestation/certificate`` (or ``/nonce``) and checks
the status, the ``error.code`` of the body, that the store holds no certificate, and that the refusal is an
event: in the device's tenant when the device is claimed, with no tenant (``tenant_id`` NULL) when it is not
or when the request is too malformed to name a device.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import secrets
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fleetward.agent.enroll import build_csr, build_enrollment
from fleetward.agent.rot import RootOfTrust, SoftwareRootOfTrust
from fleetward.api import schemas
from fleetward.authority.nonces import NonceCodec
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.compose import Services
from fleetward.config import Limits
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice, measurement
from fleetward.store import events as event_log
from fleetward.store.events import Severity
from fleetward.store.schema import certificates
from fleetward.wire.evidence import (
    MAX_CSR_CHARS,
    MAX_MEASUREMENTS,
    AnyEvidence,
    EnrollmentRequest,
    Evidence,
    Measurement,
)
from fleetward.wire.identity import device_id_for
from tests.conftest import AGENT, APP, TenantSetup, healthy_software, make_tenant

ENROLL = "/v1/attestation/certificate"
NONCE = "/v1/attestation/nonce"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Wire = dict[str, object]


@pytest.fixture
def limits() -> Limits:
    """At most two measurements (the healthy software has exactly two), so that a third is one too many."""
    return Limits(max_measurements=2)


@pytest.fixture
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


# ---------------------------------------------------------------------------------------------- helpers


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def wire(evidence: AnyEvidence, signature: bytes, csr: str) -> Wire:
    """The JSON a device sends, built from parts that need not agree with each other."""
    return {"evidence": evidence.model_dump(mode="json"), "signature": b64(signature), "csr": csr}


def csr_pem(key: SigningKey, common_name: str) -> str:
    """A well-signed CSR for any kind of key (the agent's ``build_csr`` takes EC keys only)."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def edited_csr(pem: str, old: bytes, new: bytes) -> str:
    """``pem`` with the DER bytes ``old`` replaced once by ``new``, not re-signed."""
    der = x509.load_pem_x509_csr(pem.encode("ascii")).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    body = "\n".join(textwrap.wrap(b64(der.replace(old, new)), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def spki_sha256(key: SigningKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def nonce_bytes(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def nonce_text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def another_device_id() -> str:
    return device_id_for(SoftwareRootOfTrust.generate().public_key())


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def certificate_rows(services: Services) -> int:
    """Certificates in the whole store, every tenant."""
    with services.database.read() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(certificates)).scalar_one())


def refusals_of_no_tenant(services: Services) -> list[tuple[str, str | None]]:
    """(code, device id) of the attestation events that concern no known tenant, newest first."""
    with services.database.read() as connection:
        found = event_log.query(connection, tenant_id=None, kind="attestation")
    assert all(event.severity is Severity.WARNING for event in found)
    return [(event.code, event.device_id) for event in found]


def refusals_in(tenant: TenantSetup) -> list[tuple[str, str | None]]:
    found = tenant.events(kind="attestation")
    assert all(event.severity is Severity.WARNING for event in found if event.code != "certificate_issued")
    return [(event.code, event.device_id) for event in found]


@dataclass
class Attempt:
    """A device trying to enroll: it asks the real server for nonces and builds requests, good or bad."""

    http: httpx.Client
    tenant: TenantSetup
    device: SimulatedDevice
    clock: FakeClock
    limits: Limits

    def nonce(self, device_id: str | None = None) -> str:
        response = self.http.post(NONCE, json={"device_id": device_id or self.device.device_id})
        assert response.status_code == 200, response.text
        nonce: str = response.json()["nonce"]
        return nonce

    def good(
        self,
        nonce: str | None = None,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        measurements: tuple[Measurement, ...] | None = None,
    ) -> EnrollmentRequest:
        """What the agent sends: a fresh P-256 key's CSR, evidence over it signed by the identity key."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        return build_enrollment(
            self.device.root_of_trust,
            nonce or self.nonce(),
            build_csr(key, self.device.device_id),
            measurements or self.device.software,
        )

    def signed(self, evidence: AnyEvidence, csr: str, signer: RootOfTrust | None = None) -> Wire:
        signature = (signer or self.device.root_of_trust).sign(evidence.to_be_signed())
        return wire(evidence, signature, csr)

    def with_csr_key(self, key: SigningKey) -> Wire:
        """A correctly signed request whose CSR carries ``key``, whatever its kind."""
        evidence = Evidence(
            device_id=self.device.device_id,
            nonce=self.nonce(),
            csr_key_sha256=spki_sha256(key),
            measurements=self.device.software,
        )
        return self.signed(evidence, csr_pem(key, self.device.device_id))

    def post(self, body: Wire) -> httpx.Response:
        return self.http.post(ENROLL, json=body)


@pytest.fixture
def attempt(
    http: httpx.Client, tenant: TenantSetup, device: SimulatedDevice, clock: FakeClock, limits: Limits
) -> Attempt:
    """The ``device``, claimed by ``tenant``, about to enroll."""
    tenant.claim(device)
    return Attempt(http, tenant, device, clock, limits)


# ------------------------------------------------------------------ refusals of a claimed device, by code


def _forged_signature(a: Attempt) -> Wire:
    request = a.good()
    return a.signed(request.evidence, request.csr, signer=SoftwareRootOfTrust.generate())


def _log_reordered_after_signing(a: Attempt) -> Wire:
    request = a.good()
    reordered = request.evidence.model_copy(update={"measurements": request.evidence.measurements[::-1]})
    return wire(reordered, request.signature, request.csr)


def _expired_nonce(a: Attempt) -> Wire:
    nonce = a.nonce()
    a.clock.advance(a.limits.nonce_ttl_seconds)
    return a.good(nonce).wire_dict()


def _nonce_of_another_authority(a: Attempt) -> Wire:
    foreign = NonceCodec(secrets.token_bytes(32), dt.timedelta(seconds=a.limits.nonce_ttl_seconds))
    return a.good(foreign.issue(a.device.device_id, a.clock.now()).text).wire_dict()


def _nonce_edited(edit: Callable[[bytearray], None]) -> Callable[[Attempt], Wire]:
    def build(a: Attempt) -> Wire:
        raw = bytearray(nonce_bytes(a.nonce()))
        edit(raw)
        return a.good(nonce_text(bytes(raw))).wire_dict()

    return build


def _flip_mac(raw: bytearray) -> None:
    raw[-1] ^= 0x01


def _extend_expiry(raw: bytearray) -> None:
    """An hour more, as someone who wants a longer-lived nonce would try."""
    raw[1:9] = (int.from_bytes(raw[1:9], "big") + 3600).to_bytes(8, "big")


def _version_2(raw: bytearray) -> None:
    raw[0] = 2


def _truncate(raw: bytearray) -> None:
    del raw[48:]


def _csr_of_another_key(a: Attempt) -> Wire:
    request = a.good()
    other = build_csr(ec.generate_private_key(ec.SECP256R1()), a.device.device_id)
    return wire(request.evidence, request.signature, other)


def _csr_with_bad_signature(a: Attempt) -> Wire:
    """The CSR's subject is changed after signing: its key is still the bound one, its signature fails."""
    request = a.good()
    device_id = a.device.device_id
    changed = ("0" if device_id[0] != "0" else "1") + device_id[1:]
    return wire(
        request.evidence, request.signature, edited_csr(request.csr, device_id.encode(), changed.encode())
    )


def _csr_on_unknown_curve(a: Attempt) -> Wire:
    """A P-256 CSR whose curve OID names no curve cryptography knows (1.2.840.10045.3.1.127)."""
    request = a.good()
    prime256v1 = bytes.fromhex("06082a8648ce3d030107")
    return wire(
        request.evidence, request.signature, edited_csr(request.csr, prime256v1, prime256v1[:-1] + b"\x7f")
    )


def _csr_replaced(text: str) -> Callable[[Attempt], Wire]:
    def build(a: Attempt) -> Wire:
        request = a.good()
        return wire(request.evidence, request.signature, text)

    return build


def _certificate_instead_of_csr(a: Attempt) -> Wire:
    request = a.good()
    chain = a.tenant.client.get_bytes(f"/v1/tenants/{a.tenant.id}/ca/chain").decode("ascii")
    return wire(request.evidence, request.signature, chain)


def _csr_too_large(a: Attempt) -> Wire:
    """A real CSR padded past ``max_csr_bytes`` but within the wire format's ceiling."""
    request = a.good()
    padded = request.csr + "\n" * a.limits.max_csr_bytes
    assert len(padded) <= MAX_CSR_CHARS
    return wire(request.evidence, request.signature, padded)


def _measurements(*items: Measurement) -> Callable[[Attempt], Wire]:
    return lambda a: a.good(measurements=items).wire_dict()


def _below_floor(a: Attempt) -> Wire:
    a.tenant.client.put(
        f"/v1/tenants/{a.tenant.id}/security-floors/{APP[0]}",
        schemas.SecurityFloorSet(minimum_version="2.2"),
        schemas.SecurityFloorPublic,
    )
    return a.good().wire_dict()


@dataclass(frozen=True)
class Case:
    """A bad request and the code it is refused with; each is a security refusal, so HTTP 403."""

    build: Callable[[Attempt], Wire]
    code: str


CLAIMED_DEVICE_REFUSALS: dict[str, Case] = {
    "evidence-signed-by-another-key": Case(_forged_signature, "evidence_signature_invalid"),
    "measurement-log-reordered-after-signing": Case(
        _log_reordered_after_signing, "evidence_signature_invalid"
    ),
    "nonce-expired": Case(_expired_nonce, "nonce_expired"),
    "nonce-of-another-device": Case(
        lambda a: a.good(a.nonce(another_device_id())).wire_dict(), "nonce_wrong_device"
    ),
    "nonce-of-another-authority": Case(_nonce_of_another_authority, "nonce_invalid"),
    "nonce-mac-tampered": Case(_nonce_edited(_flip_mac), "nonce_invalid"),
    "nonce-expiry-tampered": Case(_nonce_edited(_extend_expiry), "nonce_invalid"),
    "nonce-unknown-format-version": Case(_nonce_edited(_version_2), "nonce_malformed"),
    "nonce-truncated": Case(_nonce_edited(_truncate), "nonce_malformed"),
    "nonce-not-base64-length": Case(lambda a: a.good("A" * 17).wire_dict(), "nonce_malformed"),
    "csr-key-not-the-bound-one": Case(_csr_of_another_key, "csr_key_mismatch"),
    "csr-signature-invalid": Case(_csr_with_bad_signature, "csr_signature_invalid"),
    "csr-key-p384": Case(
        lambda a: a.with_csr_key(ec.generate_private_key(ec.SECP384R1())), "csr_key_unsupported"
    ),
    "csr-key-secp256k1": Case(
        lambda a: a.with_csr_key(ec.generate_private_key(ec.SECP256K1())), "csr_key_unsupported"
    ),
    "csr-key-rsa": Case(
        lambda a: a.with_csr_key(rsa.generate_private_key(65537, 2048)), "csr_key_unsupported"
    ),
    "csr-key-ed25519": Case(
        lambda a: a.with_csr_key(ed25519.Ed25519PrivateKey.generate()), "csr_key_unsupported"
    ),
    "csr-key-on-unknown-curve": Case(_csr_on_unknown_curve, "csr_key_unsupported"),
    "csr-not-pem": Case(_csr_replaced("this is not a certificate request"), "csr_malformed"),
    "csr-pem-of-garbage": Case(
        _csr_replaced(
            "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n"
        ),
        "csr_malformed",
    ),
    "csr-not-ascii": Case(_csr_replaced("-----BEGIN CERTIFICATE REQUEST-----\nü\n"), "csr_malformed"),
    "csr-is-a-certificate": Case(_certificate_instead_of_csr, "csr_malformed"),
    "csr-too-large": Case(_csr_too_large, "csr_too_large"),
    "measurement-of-tampered-image": Case(
        _measurements(measurement(*AGENT), measurement(*APP, tampered=True)), "measurement_unknown"
    ),
    "measurement-of-unregistered-version": Case(
        _measurements(measurement(*AGENT), measurement(APP[0], "2.0.0")), "measurement_unknown"
    ),
    "measurement-of-unknown-component": Case(
        _measurements(measurement(*AGENT), measurement("crypto-miner", "1.0")), "measurement_unknown"
    ),
    "measurement-below-security-floor": Case(_below_floor, "measurement_below_floor"),
    "too-many-measurements": Case(
        _measurements(*healthy_software(), measurement("extra-app", "1.0")), "too_many_measurements"
    ),
}


@pytest.mark.parametrize("case", CLAIMED_DEVICE_REFUSALS.values(), ids=CLAIMED_DEVICE_REFUSALS.keys())
def test_a_bad_enrollment_of_a_claimed_device_is_refused_with_its_code_and_recorded_in_its_tenant(
    case: Case, attempt: Attempt, services: Services
) -> None:
    response = attempt.post(case.build(attempt))

    assert_refused(response, 403, case.code)
    assert attempt.tenant.certificates() == []
    assert certificate_rows(services) == 0
    assert refusals_in(attempt.tenant) == [(case.code, attempt.device.device_id)]
    assert refusals_of_no_tenant(services) == []


# ------------------------------------------------------------------ nonces are single-use


def test_a_replayed_request_is_refused_once_its_nonce_has_been_used(
    attempt: Attempt, services: Services
) -> None:
    body = attempt.good().wire_dict()

    first = attempt.post(body)
    second = attempt.post(body)

    assert first.status_code == 200, first.text
    assert_refused(second, 403, "nonce_replayed")
    assert [c.serial for c in attempt.tenant.certificates()] == [first.json()["serial"]]
    assert certificate_rows(services) == 1
    device_id = attempt.device.device_id
    assert refusals_in(attempt.tenant) == [("nonce_replayed", device_id), ("certificate_issued", device_id)]


def test_a_used_nonce_is_refused_even_with_a_fresh_csr_and_freshly_signed_evidence(
    attempt: Attempt, services: Services
) -> None:
    nonce = attempt.nonce()
    assert attempt.post(attempt.good(nonce).wire_dict()).status_code == 200

    assert_refused(attempt.post(attempt.good(nonce).wire_dict()), 403, "nonce_replayed")
    assert certificate_rows(services) == 1


@pytest.mark.parametrize("stage", ["csr", "measurement"])
def test_a_refused_request_spends_its_valid_nonce_whatever_stage_refused_it(
    attempt: Attempt, services: Services, stage: str
) -> None:
    """A nonce is single-use: a refusal at the CSR check or at the measurements spends it all the same."""
    nonce = attempt.nonce()
    if stage == "csr":
        good = attempt.good(nonce)
        bad = wire(good.evidence, good.signature, csr_pem(ec.generate_private_key(ec.SECP256R1()), "x"))
        assert_refused(attempt.post(bad), 403, "csr_key_mismatch")
    else:
        unknown = (measurement("panel-monitor", "9.9.9"),)
        assert_refused(
            attempt.post(attempt.good(nonce, measurements=unknown).wire_dict()), 403, "measurement_unknown"
        )

    assert_refused(attempt.post(attempt.good(nonce).wire_dict()), 403, "nonce_replayed")
    assert certificate_rows(services) == 0


def test_two_concurrent_requests_with_one_nonce_earn_exactly_one_certificate(
    attempt: Attempt, server: BackgroundServer, services: Services
) -> None:
    nonce = attempt.nonce()
    bodies = [attempt.good(nonce).wire_dict() for _ in range(2)]

    async def send_both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return list(await asyncio.gather(*(client.post(ENROLL, json=body) for body in bodies)))

    responses = asyncio.run(send_both())

    assert sorted(response.status_code for response in responses) == [200, 403]
    refused = next(response for response in responses if response.status_code == 403)
    assert_refused(refused, 403, "nonce_replayed")
    assert certificate_rows(services) == 1


def test_a_csr_key_the_authority_cannot_parse_fails_only_its_own_request_not_its_batch(
    attempt: Attempt, server: BackgroundServer, services: Services
) -> None:
    """Requests are checked in batches: an unknown curve is one refusal, not an error for every device."""
    others = [SimulatedDevice(f"panel-{i:03}", healthy_software()) for i in range(2, 7)]
    attempt.tenant.claim(*others)
    bad = _csr_on_unknown_curve(attempt)
    good = [Attempt(attempt.http, attempt.tenant, other, attempt.clock, attempt.limits) for other in others]
    bodies = [bad, *(other.good().wire_dict() for other in good)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return list(await asyncio.gather(*(client.post(ENROLL, json=body) for body in bodies)))

    refused, *accepted = asyncio.run(send_all())

    assert_refused(refused, 403, "csr_key_unsupported")
    assert [response.status_code for response in accepted] == [200] * len(others)
    assert certificate_rows(services) == len(others)


# ------------------------------------------------------------------ who the device is


def test_an_unclaimed_device_is_refused_and_recorded_with_no_tenant(
    http: httpx.Client, tenant: TenantSetup, device: SimulatedDevice, clock: FakeClock, services: Services
) -> None:
    attempt = Attempt(http, tenant, device, clock, services.settings.limits)

    response = attempt.post(attempt.good().wire_dict())

    assert_refused(response, 403, "device_unclaimed")
    assert certificate_rows(services) == 0
    assert tenant.events(kind="attestation") == []
    assert refusals_of_no_tenant(services) == [("device_unclaimed", device.device_id)]


def test_a_revoked_device_gets_no_new_certificate(attempt: Attempt, services: Services) -> None:
    tenant, device_id = attempt.tenant, attempt.device.device_id
    assert attempt.post(attempt.good().wire_dict()).status_code == 200
    tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/{device_id}/revoke", schemas.Revoke(), schemas.RevokedDevice
    )

    response = attempt.post(attempt.good().wire_dict())

    assert_refused(response, 403, "device_revoked")
    held = tenant.certificates()
    assert len(held) == 1
    assert held[0].revoked_at is not None
    assert certificate_rows(services) == 1
    assert refusals_in(tenant) == [("device_revoked", device_id), ("certificate_issued", device_id)]


def test_a_device_claimed_by_one_tenant_is_invisible_to_and_unclaimable_by_another(
    server: BackgroundServer,
    admin: FleetwardClient,
    attempt: Attempt,
    services: Services,
) -> None:
    """The solar farm holds the device: the lab's operator cannot see it, take it, or get its certificates."""
    solar, device = attempt.tenant, attempt.device
    created = admin.post(
        "/v1/operators",
        schemas.OperatorCreate(email="lab@example.com", name="Lab operator", can_create_tenants=True),
        schemas.OperatorCreated,
    )
    with FleetwardClient(server.url, created.token) as lab_client:
        lab = make_tenant(lab_client, "microbiology-lab")
        as_lab = {"Authorization": f"Bearer {created.token}"}

        seen_in_lab = attempt.http.get(f"/v1/tenants/{lab.id}/devices/{device.device_id}", headers=as_lab)
        seen_in_solar = attempt.http.get(f"/v1/tenants/{solar.id}/devices/{device.device_id}", headers=as_lab)
        claim = lab.claim(device)
        enrolled = attempt.post(attempt.good().wire_dict())

        assert_refused(seen_in_lab, 404, "device_not_found")
        assert_refused(seen_in_solar, 403, "no_role_in_tenant")
        assert (claim.claimed, claim.refused) == (0, 1)
        assert claim.results[0].code == "claimed_elsewhere"
        assert [(e.code, e.device_id) for e in lab.events(kind="claim")] == [
            ("claimed_elsewhere", device.device_id)
        ]
        assert lab_client.get_list(f"/v1/tenants/{lab.id}/devices", schemas.DevicePublic) == []
        assert enrolled.status_code == 200, enrolled.text
        assert enrolled.json()["tenant_id"] == solar.id
        assert lab.certificates() == []
        assert lab.events(kind="attestation") == []
        assert [c.tenant_id for c in solar.certificates()] == [solar.id]


# ------------------------------------------------------------------ malformed requests name no device


def _without(field: str) -> Callable[[Attempt], Wire]:
    def build(a: Attempt) -> Wire:
        body = a.good().wire_dict()
        del body[field]
        return body

    return build


def _with(**fields: object) -> Callable[[Attempt], Wire]:
    return lambda a: {**a.good().wire_dict(), **fields}


def _evidence_with(**fields: object) -> Callable[[Attempt], Wire]:
    """A good request whose evidence carries ``fields`` (signed or not does not matter: it never parses)."""

    def build(a: Attempt) -> Wire:
        request = a.good()
        return {**request.wire_dict(), "evidence": {**request.evidence.model_dump(mode="json"), **fields}}

    return build


def _measurement_with(**fields: object) -> Callable[[Attempt], Wire]:
    def build(a: Attempt) -> Wire:
        request = a.good()
        first = {**request.evidence.measurements[0].model_dump(mode="json"), **fields}
        return {
            **request.wire_dict(),
            "evidence": {**request.evidence.model_dump(mode="json"), "measurements": [first]},
        }

    return build


def _raw(body: bytes) -> Callable[[Attempt], bytes]:
    return lambda _a: body


def _json(build: Callable[[Attempt], Wire]) -> Callable[[Attempt], bytes]:
    return lambda a: httpx.Request("POST", "/", json=build(a)).read()


_many = [{"name": f"c{i}", "version": "1.0", "sha256": "00" * 32} for i in range(MAX_MEASUREMENTS + 1)]

MALFORMED: dict[str, Callable[[Attempt], bytes]] = {
    "not-json": _raw(b'{"evidence": '),
    "empty-body": _raw(b""),
    "json-array": _raw(b"[]"),
    "json-null": _raw(b"null"),
    "no-signature": _json(_without("signature")),
    "no-evidence": _json(_without("evidence")),
    "signature-not-base64": _json(_with(signature="not*base64")),
    "signature-too-short": _json(_with(signature=b64(b"1234"))),
    "csr-empty": _json(_with(csr="")),
    "csr-beyond-wire-ceiling": _json(_with(csr="A" * (MAX_CSR_CHARS + 1))),
    "unknown-top-level-field": _json(_with(firmware="1.0")),
    "unknown-evidence-field": _json(_evidence_with(debug=True)),
    "unknown-measurement-field": _json(_measurement_with(signer="me")),
    "evidence-format-v2": _json(_evidence_with(format="fleetward-evidence-v2")),
    "device-id-upper-case": _json(lambda a: _evidence_with(device_id=a.device.device_id.upper())(a)),
    "nonce-not-base64url-text": _json(_evidence_with(nonce="this is not a nonce!")),
    "nonce-longer-than-the-wire-allows": _json(_evidence_with(nonce="A" * 257)),
    "no-measurements": _json(_evidence_with(measurements=[])),
    "measurements-beyond-wire-ceiling": _json(_evidence_with(measurements=_many)),
    "version-with-leading-zero": _json(_measurement_with(version="02.1.0")),
    "version-with-trailing-newline": _json(_measurement_with(version="2.1.0\n")),
    "version-with-pre-release-tag": _json(_measurement_with(version="2.1.0-rc1")),
}


def test_each_malformed_enrollment_is_refused_as_such_and_recorded_with_no_tenant_or_device(
    attempt: Attempt, services: Services, subtests: pytest.Subtests
) -> None:
    """One server for the whole table (a subtest per row): each row adds exactly one event of no tenant."""
    for name, build in MALFORMED.items():
        with subtests.test(name):
            before = refusals_of_no_tenant(services)

            response = attempt.http.post(
                ENROLL, content=build(attempt), headers={"Content-Type": "application/json"}
            )

            assert_refused(response, 400, "enrollment_malformed")
            assert refusals_of_no_tenant(services) == [("enrollment_malformed", None), *before]
    assert certificate_rows(services) == 0
    assert attempt.tenant.events(kind="attestation") == []


# ------------------------------------------------------------------ size limits


def _padded_json(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (never a valid enrollment)."""
    head, tail = b'{"pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_a_body_larger_than_the_limit_is_refused_by_its_declared_length(
    http: httpx.Client, services: Services
) -> None:
    body = _padded_json(services.settings.limits.max_request_bytes + 1)

    response = http.post(ENROLL, content=body, headers={"Content-Type": "application/json"})

    assert_refused(response, 413, "payload_too_large")
    assert certificate_rows(services) == 0
    assert refusals_of_no_tenant(services) == [("payload_too_large", None)]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(http: httpx.Client, services: Services) -> None:
    """No Content-Length to go by: the limit is enforced while the body streams in."""
    body = _padded_json(services.settings.limits.max_request_bytes + 1)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = http.post(ENROLL, content=chunks(), headers={"Content-Type": "application/json"})

    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.request.headers
    assert_refused(response, 413, "payload_too_large")
    assert certificate_rows(services) == 0
    assert refusals_of_no_tenant(services) == [("payload_too_large", None)]


def test_a_body_of_exactly_the_limit_is_read_and_judged_on_its_content(
    http: httpx.Client, services: Services
) -> None:
    body = _padded_json(services.settings.limits.max_request_bytes)

    response = http.post(ENROLL, content=body, headers={"Content-Type": "application/json"})

    assert_refused(response, 400, "enrollment_malformed")
    assert refusals_of_no_tenant(services) == [("enrollment_malformed", None)]


# ------------------------------------------------------------------ nonce requests


NONCE_REQUESTS_MALFORMED: dict[str, bytes] = {
    "not-json": b"{",
    "empty-body": b"",
    "json-array": b"[]",
    "no-device-id": b"{}",
    "device-id-upper-case": b'{"device_id": "' + b"AB" * 32 + b'"}',
    "device-id-too-short": b'{"device_id": "' + b"ab" * 31 + b'"}',
    "device-id-with-trailing-newline": b'{"device_id": "' + b"ab" * 32 + b'\\n"}',
    "device-id-a-number": b'{"device_id": 7}',
    "unknown-field": b'{"device_id": "' + b"ab" * 32 + b'", "tenant": "x"}',
}


def test_each_malformed_nonce_request_is_refused_with_400(
    http: httpx.Client, subtests: pytest.Subtests
) -> None:
    for name, body in NONCE_REQUESTS_MALFORMED.items():
        with subtests.test(name):
            response = http.post(NONCE, content=body, headers={"Content-Type": "application/json"})
            assert_refused(response, 400, "nonce_request_malformed")


def test_an_oversized_nonce_request_is_refused_with_413(http: httpx.Client, services: Services) -> None:
    body = _padded_json(services.settings.limits.max_request_bytes + 1)
    response = http.post(NONCE, content=body, headers={"Content-Type": "application/json"})
    assert_refused(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "limits",
    [
        Limits(
            max_measurements=2,
            refusal_events_per_device_per_minute=3,
            unattributed_refusal_events_per_minute=4,
        )
    ],
)
def test_repeated_refusals_are_each_answered_but_recorded_only_within_the_per_minute_budget(
    attempt: Attempt, services: Services, clock: FakeClock
) -> None:
    """A device that repeats a refused request, or a stranger inventing device ids, cannot fill the log."""
    claimed, tenant = attempt.device, attempt.tenant
    for _ in range(5):
        assert_refused(attempt.post(_forged_signature(attempt)), 403, "evidence_signature_invalid")
    strangers = [SimulatedDevice(f"stranger-{n}", healthy_software()) for n in range(6)]
    for stranger in strangers:
        unclaimed = Attempt(attempt.http, tenant, stranger, clock, attempt.limits)
        assert_refused(unclaimed.post(unclaimed.good().wire_dict()), 403, "device_unclaimed")

    assert refusals_in(tenant) == [("evidence_signature_invalid", claimed.device_id)] * 3
    assert len(refusals_of_no_tenant(services)) == 4

    clock.advance(60)  # a new minute, a new budget
    assert_refused(attempt.post(_forged_signature(attempt)), 403, "evidence_signature_invalid")
    assert len(refusals_in(tenant)) == 4
