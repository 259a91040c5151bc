"""Attestation evidence and the enrollment messages that carry it (docs/wire.md has a worked example).

The device signs, with its identity key, a fixed-length statement binding four things::

    b"fleetward-evidence-v1\\x00"
    || device id              (32 bytes, the raw SHA-256 the hex id names)
    || SHA-256(nonce)         (32 bytes, over the nonce's ASCII text)
    || csr_key_sha256         (32 bytes, SHA-256 over the DER SubjectPublicKeyInfo of the CSR's key)
    || measurement log digest (32 bytes, see below)

The measurement log digest is computed the way a TPM extends a SHA-256 PCR, so that the same log later
replays against a TPM quote: start from 32 zero bytes and, for each launched component in order,
``digest = SHA-256(digest || SHA-256(b"fleetward-measurement-v1\\x00" || name || 0x00 || version || 0x00 ||
image SHA-256))``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from fleetward.wire.identity import DeviceId, Sha256Hex
from fleetward.wire.versions import check_version

EVIDENCE_FORMAT: Literal["fleetward-evidence-v1"] = "fleetward-evidence-v1"
_EVIDENCE_DOMAIN = b"fleetward-evidence-v1\x00"
_MEASUREMENT_DOMAIN = b"fleetward-measurement-v1\x00"

#: Hard ceilings of the wire format; the authority applies its own, usually smaller, configured limits.
MAX_MEASUREMENTS = 256
MAX_NONCE_CHARS = 256
MAX_SIGNATURE_BYTES = 160
MAX_CSR_CHARS = 16 * 1024

ComponentName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$", min_length=1, max_length=128),
]
VersionText = Annotated[str, StringConstraints(max_length=64), AfterValidator(check_version)]
NonceText = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$", min_length=16, max_length=MAX_NONCE_CHARS)
]


class Measurement(BaseModel):
    """One launched component: what it is, which version, and the SHA-256 of its image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ComponentName
    version: VersionText
    sha256: Sha256Hex

    def event_digest(self) -> bytes:
        """The digest this measurement extends the log with."""
        return hashlib.sha256(
            _MEASUREMENT_DOMAIN
            + self.name.encode("ascii")
            + b"\x00"
            + self.version.encode("ascii")
            + b"\x00"
            + bytes.fromhex(self.sha256)
        ).digest()


def measurement_log_digest(measurements: tuple[Measurement, ...] | list[Measurement]) -> bytes:
    """Fold the log the way a TPM extends a SHA-256 PCR."""
    digest = bytes(32)
    for measurement in measurements:
        digest = hashlib.sha256(digest + measurement.event_digest()).digest()
    return digest


class Evidence(BaseModel):
    """What a device states about itself, for one nonce and one CSR."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["fleetward-evidence-v1"] = EVIDENCE_FORMAT
    device_id: DeviceId
    nonce: NonceText
    csr_key_sha256: Sha256Hex
    measurements: tuple[Measurement, ...] = Field(min_length=1, max_length=MAX_MEASUREMENTS)

    def to_be_signed(self) -> bytes:
        """The exact bytes the identity key signs (ECDSA P-256 with SHA-256, DER signature)."""
        return (
            _EVIDENCE_DOMAIN
            + bytes.fromhex(self.device_id)
            + hashlib.sha256(self.nonce.encode("ascii")).digest()
            + bytes.fromhex(self.csr_key_sha256)
            + measurement_log_digest(self.measurements)
        )


def _decode_base64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    if len(value) > MAX_SIGNATURE_BYTES * 2:
        raise ValueError("is longer than any signature fleetward accepts")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("is not valid base64") from None


class EnrollmentRequest(BaseModel):
    """``POST /v1/attestation/certificate``: evidence, its signature and the CSR it binds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    evidence: Evidence
    signature: bytes = Field(description="DER ECDSA signature over the evidence, base64")
    csr: str = Field(min_length=1, max_length=MAX_CSR_CHARS, description="PKCS#10 CSR, PEM")

    @field_validator("signature", mode="before")
    @classmethod
    def _signature_from_base64(cls, value: object) -> bytes:
        signature = _decode_base64(value)
        if not 8 <= len(signature) <= MAX_SIGNATURE_BYTES:
            raise ValueError("is not the length of an ECDSA P-256 DER signature")
        return signature

    def wire_dict(self) -> dict[str, object]:
        """The JSON object a device sends."""
        return {
            "evidence": self.evidence.model_dump(mode="json"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "csr": self.csr,
        }


class NonceRequest(BaseModel):
    """``POST /v1/attestation/nonce``: a device asks for a challenge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: DeviceId


class NonceResponse(BaseModel):
    """A single-use challenge, valid until ``expires_at``."""

    model_config = ConfigDict(frozen=True)

    nonce: str
    expires_at: dt.datetime


class EnrollmentResponse(BaseModel):
    """An operational certificate and the chain up to the tenant's root."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    tenant_id: str
    serial: str
    certificate: str = Field(description="the operational certificate, PEM")
    chain: list[str] = Field(description="issuing CA then root CA, PEM")
    not_before: dt.datetime
    not_after: dt.datetime
    renew_after: dt.datetime = Field(description="the half-life: renew from here, with jitter")
