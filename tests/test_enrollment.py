"""A claimed device with known software earns a 24-hour certificate, renews it, and loses it on revocation."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetward.agent.enroll import EnrollmentClient, OperationalCredential
from fleetward.agent.rot import SoftwareRootOfTrust
from fleetward.api import schemas
from fleetward.authority.ca import parse_device_uri
from fleetward.errors import TransportError
from fleetward.server import BackgroundServer
from fleetward.sim.fleet import SimulatedDevice
from tests.conftest import TenantSetup, healthy_software


def enroll(server: BackgroundServer, device: SimulatedDevice) -> OperationalCredential:
    async def run() -> OperationalCredential:
        async with httpx.AsyncClient(timeout=30) as http:
            return await device.enroll(server.url, http)

    return asyncio.run(run())


def test_a_claimed_device_earns_a_certificate_of_the_documented_profile(
    server: BackgroundServer, tenant: TenantSetup, device: SimulatedDevice
) -> None:
    tenant.claim(device)
    credential = enroll(server, device)
    certificate = x509.load_pem_x509_certificate(credential.issued.certificate.encode())

    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device.device_id
    uris = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert parse_device_uri(uris.get_values_for_type(x509.UniformResourceIdentifier)[0]) == (
        tenant.id,
        device.device_id,
    )
    assert certificate.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)
    assert certificate.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(hours=23)
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert key.public_numbers() == credential.key.public_key().public_numbers()
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name is not None
    assert points[0].full_name[0].value == f"{server.url}/v1/tenants/{tenant.id}/crl"
    issued = credential.issued
    assert issued.renew_after - issued.not_before == pytest.approx(
        (issued.not_after - issued.not_before) / 2, abs=dt.timedelta(minutes=3)
    )
    shown = tenant.client.get(f"/v1/tenants/{tenant.id}/devices/{device.device_id}", schemas.DevicePublic)
    assert shown.last_attested_at is not None
    assert [event.code for event in tenant.events(kind="attestation")] == ["certificate_issued"]


def test_renewal_is_the_same_flow_and_keeps_the_operational_key(
    server: BackgroundServer, tenant: TenantSetup, device: SimulatedDevice
) -> None:
    tenant.claim(device)
    first = enroll(server, device)
    second = enroll(server, device)
    assert second.issued.serial != first.issued.serial
    assert second.key is first.key
    assert len(tenant.certificates(device.device_id)) == 2


def test_the_chain_and_crl_verify_with_openssl_and_a_revoked_certificate_fails(
    server: BackgroundServer, tenant: TenantSetup, tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "scripts/setup installs openssl"
    keeper = SimulatedDevice("keeper", healthy_software())
    victim = SimulatedDevice("victim", healthy_software())
    tenant.claim(keeper, victim)
    kept, lost = enroll(server, keeper), enroll(server, victim)
    revoked = tenant.client.post(
        f"/v1/tenants/{tenant.id}/devices/{victim.device_id}/revoke",
        schemas.Revoke(),
        schemas.RevokedDevice,
    )
    assert revoked.certificates_revoked == 1
    chain = tenant.client.get_bytes(f"/v1/tenants/{tenant.id}/ca/chain")
    crl = x509.load_der_x509_crl(httpx.get(f"{server.url}/v1/tenants/{tenant.id}/crl").content)
    assert [entry.serial_number for entry in crl] == [int(lost.issued.serial, 16)]
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def verify(credential: OperationalCredential) -> subprocess.CompletedProcess[str]:
        leaf = tmp_path / f"{credential.issued.serial}.pem"
        leaf.write_text(credential.issued.certificate)
        return subprocess.run(
            [
                openssl,
                "verify",
                "-CAfile",
                str(tmp_path / "chain.pem"),
                "-CRLfile",
                str(tmp_path / "crl.pem"),
                "-crl_check",
                str(leaf),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    good = verify(kept)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = verify(lost)
    assert bad.returncode != 0
    assert "certificate revoked" in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("answers", "path"),
    [
        ({"/v1/attestation/nonce": b"<html>a captive portal</html>"}, "/v1/attestation/nonce"),
        (
            {
                "/v1/attestation/nonce": b'{"nonce": "'
                + b"n" * 43
                + b'", "expires_at": "2026-12-01T00:02:00Z"}',
                "/v1/attestation/certificate": b'{"certificate": 42}',
            },
            "/v1/attestation/certificate",
        ),
    ],
    ids=["nonce", "certificate"],
)
def test_an_answer_that_is_not_the_authority_s_format_is_a_retryable_transport_error(
    answers: dict[str, bytes], path: str
) -> None:
    """A proxy or a broken server answering 200: the device retries later rather than crash."""

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answers[request.url.path])

    async def run() -> None:
        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(respond)) as http,
            EnrollmentClient("https://authority.test", SoftwareRootOfTrust.generate(), http=http) as client,
        ):
            await client.enroll(healthy_software())

    with pytest.raises(TransportError) as failed:
        asyncio.run(run())
    assert failed.value.code == "authority_answer_malformed"
    assert path in failed.value.message
