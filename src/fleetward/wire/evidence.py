"""Attestation evidence and the enrollment messages that carry it (docs/wire.md has a worked example).

Every form of evidence states the same fixed-length statement, binding four things::

    b"fleetward-evidence-v1\\x00"
    || device id              (32 bytes, the raw SHA-256 the hex id names)
    || SHA-256(nonce)         (32 bytes, over the nonce's ASCII text)
    || csr_key_sha256         (32 bytes, SHA-256 over the DER SubjectPublicKeyInfo of the CSR's key)
    || measurement log digest (32 bytes, see below)

The measurement log digest is computed the way a TPM extends a SHA-256 PCR, so that the same log later
replays against a TPM quote: start from 32 zero bytes and, for each launched component in order,
``digest = SHA-256(digest || SHA-256(b"fleetward-measurement-v1\\x00" || name || 0x00 || version || 0x00 ||
image SHA-256))``.

The statement reaches the authority in one of two forms, told apart by ``evidence.format``:

- ``fleetward-evidence-v1`` (:class:`Evidence`): the identity key signs the statement itself (ECDSA P-256
  over SHA-256, DER). Software and PKCS#11 roots of trust, which can sign any data, send this.
- ``fleetward-tpm-quote-v1`` (:class:`TpmQuoteEvidence`): a TPM's restricted attestation key cannot sign
  data it did not produce, so it quotes instead: a TPM2_Quote over one SHA-256 PCR, whose qualifying data
  is SHA-256 of the statement. The evidence carries the marshalled ``TPMS_ATTEST`` and the PCR index; the
  signature is the identity key's, over SHA-256 of the ``TPMS_ATTEST`` bytes. The measurement log is the
  same, and its digest is what the PCR holds when the quote is made.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_serializer,
    field_validator,
)

from fleetward.wire.identity import DeviceId, Sha256Hex
from fleetward.wire.versions import check_version

EVIDENCE_FORMAT: Literal["fleetward-evidence-v1"] = "fleetward-evidence-v1"
TPM_QUOTE_FORMAT: Literal["fleetward-tpm-quote-v1"] = "fleetward-tpm-quote-v1"
_EVIDENCE_DOMAIN = b"fleetward-evidence-v1\x00"
_MEASUREMENT_DOMAIN = b"fleetward-measurement-v1\x00"

#: Hard ceilings of the wire format; the authority applies its own, usually smaller, configured limits.
MAX_MEASUREMENTS = 256
MAX_NONCE_CHARS = 256
MAX_SIGNATURE_BYTES = 160
MAX_CSR_CHARS = 16 * 1024
#: A quote's TPMS_ATTEST is about 145 bytes for one SHA-256 PCR; this leaves room for any name and nonce size.
MAX_ATTEST_BYTES = 1024

#: The PCRs a TPM quote may cover: the two an application may reset at locality 0 (TCG PC Client profile),
#: so that the agent can start the log from 32 zero bytes, as the log digest does. 23 is the application
#: PCR (the default on devices); 16 is the debug PCR (used by tests and development).
QuotablePcr = Literal[16, 23]
QUOTABLE_PCRS: tuple[int, ...] = get_args(QuotablePcr)

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


class _Statement(BaseModel):
    """What every form of evidence states: the device, the nonce, the CSR key and the measurement log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str
    device_id: DeviceId
    nonce: NonceText
    csr_key_sha256: Sha256Hex
    measurements: tuple[Measurement, ...] = Field(min_length=1, max_length=MAX_MEASUREMENTS)

    def to_be_signed(self) -> bytes:
        """The 150-byte statement: signed as such (v1 evidence), or hashed into a quote (TPM evidence)."""
        return (
            _EVIDENCE_DOMAIN
            + bytes.fromhex(self.device_id)
            + hashlib.sha256(self.nonce.encode("ascii")).digest()
            + bytes.fromhex(self.csr_key_sha256)
            + measurement_log_digest(self.measurements)
        )

    def statement_sha256(self) -> bytes:
        """SHA-256 of the statement: the qualifying data of a TPM quote over it."""
        return hashlib.sha256(self.to_be_signed()).digest()


class Evidence(_Statement):
    """What a device states about itself, for one nonce and one CSR, signed as it is by the identity key."""

    format: Literal["fleetward-evidence-v1"] = EVIDENCE_FORMAT

    def signed_message(self) -> bytes:
        """What the request's signature covers (ECDSA P-256 with SHA-256): the statement itself."""
        return self.to_be_signed()


def _decode_base64(value: object, max_bytes: int, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise ValueError(f"is longer than any {what} fleetward accepts")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("is not valid base64") from None


class TpmQuoteEvidence(_Statement):
    """The same statement, quoted by a TPM: its restricted attestation key signs only what the TPM made.

    ``attest`` is the marshalled ``TPMS_ATTEST`` of a TPM2_Quote over the SHA-256 bank's PCR
    ``pcr_index``, made with qualifying data SHA-256(:meth:`to_be_signed`). The request's signature is the
    identity key's over SHA-256 of ``attest``, DER-encoded.
    """

    format: Literal["fleetward-tpm-quote-v1"] = TPM_QUOTE_FORMAT
    pcr_index: QuotablePcr = Field(description="the SHA-256 PCR the measurements were extended into")
    attest: bytes = Field(description="the quote's marshalled TPMS_ATTEST, base64")

    @classmethod
    def of(cls, statement: Evidence, pcr_index: QuotablePcr, attest: bytes) -> TpmQuoteEvidence:
        """The quoted form of ``statement``."""
        return cls(
            device_id=statement.device_id,
            nonce=statement.nonce,
            csr_key_sha256=statement.csr_key_sha256,
            measurements=statement.measurements,
            pcr_index=pcr_index,
            attest=attest,
        )

    @field_validator("attest", mode="before")
    @classmethod
    def _attest_from_base64(cls, value: object) -> bytes:
        attest = _decode_base64(value, MAX_ATTEST_BYTES, "TPMS_ATTEST")
        if not 1 <= len(attest) <= MAX_ATTEST_BYTES:
            raise ValueError(f"must be 1 to {MAX_ATTEST_BYTES} bytes")
        return attest

    @field_serializer("attest", when_used="json")
    def _attest_to_base64(self, attest: bytes) -> str:
        return base64.b64encode(attest).decode("ascii")

    def signed_message(self) -> bytes:
        """What the request's signature covers (ECDSA P-256 with SHA-256): the ``TPMS_ATTEST`` bytes."""
        return self.attest


#: Evidence in any of its forms.
AnyEvidence = Evidence | TpmQuoteEvidence


def _evidence_format(value: object) -> str | None:
    """The form of evidence ``value`` is in; ``fleetward-evidence-v1`` when a JSON object names none."""
    found = (
        value.get("format", EVIDENCE_FORMAT) if isinstance(value, dict) else getattr(value, "format", None)
    )
    return found if isinstance(found, str) else None


TaggedEvidence = Annotated[
    Annotated[Evidence, Tag(EVIDENCE_FORMAT)] | Annotated[TpmQuoteEvidence, Tag(TPM_QUOTE_FORMAT)],
    Discriminator(_evidence_format),
]


class EnrollmentRequest(BaseModel):
    """``POST /v1/attestation/certificate``: evidence, its signature and the CSR it binds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    evidence: TaggedEvidence
    signature: bytes = Field(
        description="DER ECDSA signature by the identity key over evidence.signed_message(), base64"
    )
    csr: str = Field(min_length=1, max_length=MAX_CSR_CHARS, description="PKCS#10 CSR, PEM")

    @field_validator("signature", mode="before")
    @classmethod
    def _signature_from_base64(cls, value: object) -> bytes:
        signature = _decode_base64(value, MAX_SIGNATURE_BYTES, "signature")
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
