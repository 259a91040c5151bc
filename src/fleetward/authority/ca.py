"""Certificate and CRL profiles: pure functions from keys, names and times to signed X.509 objects.

Per tenant: a root CA (ECDSA P-384, long-lived, signs only the issuing CA and its CRL) and an issuing CA
(ECDSA P-256, signs operational certificates and their CRL). Operational certificates follow the profile
in docs/wire.md: P-256 key, CN = device id, a URI SAN naming tenant and device, client authentication,
24 hours by default.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SIGNATURE_HASH = hashes.SHA256()
DEVICE_URI_PREFIX = "urn:fleetward:tenant:"


def device_uri(tenant_id: str, device_id: str) -> str:
    """The URI SAN of an operational certificate."""
    return f"{DEVICE_URI_PREFIX}{tenant_id}:device:{device_id}"


def parse_device_uri(uri: str) -> tuple[str, str]:
    """``(tenant_id, device_id)`` from a URI SAN, or ``ValueError``."""
    if not uri.startswith(DEVICE_URI_PREFIX):
        raise ValueError("not a fleetward device URI")
    tenant_id, separator, device_id = uri[len(DEVICE_URI_PREFIX) :].partition(":device:")
    if not separator or not tenant_id or not device_id:
        raise ValueError("not a fleetward device URI")
    return tenant_id, device_id


def _name(common_name: str, tenant_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetward"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"tenant {tenant_id}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root_ca(
    key: ec.EllipticCurvePrivateKey, tenant_id: str, now: dt.datetime, validity: dt.timedelta
) -> x509.Certificate:
    name = _name("fleetward tenant root CA", tenant_id)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA384())
    )


def build_issuing_ca(
    root_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    tenant_id: str,
    now: dt.datetime,
    validity: dt.timedelta,
    root_crl_url: str,
) -> x509.Certificate:
    public_key = key.public_key()
    not_after = min(now + validity, root.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("fleetward tenant issuing CA", tenant_id))
        .issuer_name(root.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .add_extension(_distribution_point(root_crl_url), critical=False)
        .sign(root_key, hashes.SHA384())
    )


def _distribution_point(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


@dataclass(frozen=True)
class Issuer:
    """An issuing CA ready to sign: its key, its certificate and the chain above it."""

    id: str
    tenant_id: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    root: x509.Certificate
    crl_url: str

    @functools.cached_property
    def operational_template(self) -> x509.CertificateBuilder:
        """What every operational certificate of this issuer shares, built once (it is the hot path)."""
        return (
            x509.CertificateBuilder()
            .issuer_name(self.certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .add_extension(_distribution_point(self.crl_url), critical=False)
        )


def issue_operational_certificate(
    issuer: Issuer,
    public_key: ec.EllipticCurvePublicKey,
    device_id: str,
    serial: int,
    now: dt.datetime,
    validity: dt.timedelta,
    backdate: dt.timedelta,
) -> x509.Certificate:
    """The 24-hour certificate a device earns by attesting."""
    not_after = min(now + validity, issuer.certificate.not_valid_after_utc)
    return (
        issuer.operational_template.subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetward"),
                    x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                ]
            )
        )
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(device_uri(issuer.tenant_id, device_id))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(issuer.key, SIGNATURE_HASH)
    )


def der_to_pem(der: bytes, label: str = "CERTIFICATE") -> str:
    """PEM text of DER bytes, without parsing them again."""
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[index : index + 64] for index in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n"


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags


def build_crl(
    key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    entries: Iterable[RevokedEntry],
    number: int,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateRevocationList:
    """A CRL of ``entries``, signed by the CA of ``key`` and ``certificate``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(certificate.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(x509.CRLReason(entry.reason), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    hash_algorithm = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else SIGNATURE_HASH
    return builder.sign(key, hash_algorithm)


def build_proof_of_possession(
    key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    verification_code: str,
    now: dt.datetime,
) -> x509.Certificate:
    """A certificate whose CN is a third party's verification code, signed by the tenant CA.

    A cloud that asks for proof of possession of a CA (Azure IoT Hub and DPS do) checks this signature
    against the CA certificate it was given.
    """
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    hash_algorithm = hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else SIGNATURE_HASH
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, verification_code)]))
        .issuer_name(certificate.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hash_algorithm)
    )
