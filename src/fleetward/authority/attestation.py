"""The pure core of attestation: does this evidence earn a certificate?

Two steps, both free of I/O. :func:`prepare` checks what needs no stored state: the size of the request,
the nonce (issued here, to this device, not expired), and the CSR (well formed, self-signed, a P-256
key whose hash the evidence binds) and, for TPM evidence, the quote (well formed, over this statement,
covering exactly the named PCR, whose value is the measurement log's). :func:`judge` then checks the
request against what the store knows: the device is claimed, the evidence is signed by its identity key,
the device is not revoked, and every measurement is a reference value of its tenant at or above the
component's security floor.

Each refusal raises :class:`AttestationRefused` with a code listed in docs/wire.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.authority.nonces import Nonce, NonceCodec
from fleetward.authority.quote import TPM_ALG_SHA256, PcrSelection, QuoteMalformed, parse_quote
from fleetward.config import Limits
from fleetward.errors import AttestationRefused
from fleetward.wire.evidence import (
    EnrollmentRequest,
    Measurement,
    TpmQuoteEvidence,
    measurement_log_digest,
)
from fleetward.wire.identity import SUPPORTED_CURVE, public_key_sha256
from fleetward.wire.versions import Version, parse_version


@dataclass(frozen=True)
class PreparedEnrollment:
    """An enrollment request whose nonce and CSR have been checked."""

    request: EnrollmentRequest
    nonce: Nonce
    csr_public_key: ec.EllipticCurvePublicKey

    @property
    def device_id(self) -> str:
        return self.request.evidence.device_id


@dataclass(frozen=True)
class DeviceStanding:
    """What the store knows of a device at the moment of judging."""

    device_id: str
    tenant_id: str
    identity_key: ec.EllipticCurvePublicKey
    revoked: bool
    #: quarantined, or restricted by its health: its certificate is for remediation only
    restricted: bool = False


@dataclass(frozen=True)
class ReferencePolicy:
    """A tenant's reference values (component, version, SHA-256) and security floors."""

    references: frozenset[tuple[str, str, str]] = frozenset()
    floors: Mapping[str, str] = field(default_factory=dict)

    def floor_of(self, component: str) -> Version | None:
        text = self.floors.get(component)
        return None if text is None else parse_version(text)


def prepare(
    request: EnrollmentRequest, codec: NonceCodec, now: dt.datetime, limits: Limits
) -> PreparedEnrollment:
    """Check the nonce, the CSR and any quote; raise :class:`AttestationRefused` on the first failure."""
    evidence = request.evidence
    if len(evidence.measurements) > limits.max_measurements:
        raise AttestationRefused(
            f"the measurement log has {len(evidence.measurements)} entries; "
            f"the limit is {limits.max_measurements}",
            code="too_many_measurements",
        )
    nonce = codec.open(evidence.nonce, evidence.device_id, now)
    csr_bytes = request.csr.encode("ascii", "replace")
    if len(csr_bytes) > limits.max_csr_bytes:
        raise AttestationRefused(f"the CSR is larger than {limits.max_csr_bytes} bytes", code="csr_too_large")
    try:
        csr = x509.load_pem_x509_csr(csr_bytes)
        csr_key = csr.public_key()
        signature_valid = csr.is_signature_valid
    except (ValueError, TypeError):
        raise AttestationRefused("the CSR is not a valid PEM PKCS#10 request", code="csr_malformed") from None
    except UnsupportedAlgorithm:  # a key type or curve cryptography does not know: certainly not P-256
        raise AttestationRefused("the CSR's key must be ECDSA P-256", code="csr_key_unsupported") from None
    if not isinstance(csr_key, ec.EllipticCurvePublicKey) or not isinstance(csr_key.curve, SUPPORTED_CURVE):
        raise AttestationRefused("the CSR's key must be ECDSA P-256", code="csr_key_unsupported")
    if not signature_valid:
        raise AttestationRefused("the CSR's signature does not verify", code="csr_signature_invalid")
    if public_key_sha256(csr_key) != evidence.csr_key_sha256:
        raise AttestationRefused("the CSR's key is not the one the evidence binds", code="csr_key_mismatch")
    if isinstance(evidence, TpmQuoteEvidence):
        check_quote(evidence)
    return PreparedEnrollment(request=request, nonce=nonce, csr_public_key=csr_key)


def check_quote(evidence: TpmQuoteEvidence) -> None:
    """The quote's content against the statement and the log; its signature is :func:`judge`'s to check.

    A quote is over this statement when its qualifying data is SHA-256 of it: that binds the device id,
    the nonce, the CSR key and the log digest. It covers exactly the SHA-256 bank's PCR ``pcr_index``,
    and that PCR holds what replaying the log from 32 zero bytes gives.
    """
    try:
        quote = parse_quote(evidence.attest)
    except QuoteMalformed as error:
        raise AttestationRefused(
            f"the quote is not a TPM2_Quote's TPMS_ATTEST: {error}", code="quote_malformed"
        ) from None
    wanted = (PcrSelection(TPM_ALG_SHA256, frozenset({evidence.pcr_index})),)
    if quote.pcr_selections != wanted:
        raise AttestationRefused(
            f"the quote must cover exactly PCR {evidence.pcr_index} of the SHA-256 bank",
            code="quote_pcr_selection_invalid",
        )
    if quote.extra_data != evidence.statement_sha256():
        raise AttestationRefused(
            "the quote was made for another statement (another nonce, CSR key, device or log)",
            code="quote_nonce_mismatch",
        )
    if quote.pcr_digest != hashlib.sha256(measurement_log_digest(evidence.measurements)).digest():
        raise AttestationRefused(
            f"PCR {evidence.pcr_index} as quoted is not what the measurement log replays to",
            code="quote_pcr_mismatch",
        )


def judge(prepared: PreparedEnrollment, device: DeviceStanding | None, policy: ReferencePolicy) -> None:
    """Accept the enrollment or raise :class:`AttestationRefused` saying why not."""
    if device is None:
        raise AttestationRefused("the device is not claimed by any tenant", code="device_unclaimed")
    try:
        device.identity_key.verify(
            prepared.request.signature,
            prepared.request.evidence.signed_message(),
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature:
        raise AttestationRefused(
            "the evidence is not signed by the device's identity key",
            code="evidence_signature_invalid",
        ) from None
    if device.revoked:
        raise AttestationRefused("the device is revoked", code="device_revoked")
    for measurement in prepared.request.evidence.measurements:
        check_measurement(measurement, policy)


def check_measurement(measurement: Measurement, policy: ReferencePolicy) -> None:
    """One launched component against the tenant's reference values and floor."""
    key = (measurement.name, measurement.version, measurement.sha256)
    if key not in policy.references:
        raise AttestationRefused(
            f"component {measurement.name} {measurement.version} with SHA-256 "
            f"{measurement.sha256[:16]}… is not a registered reference value",
            code="measurement_unknown",
        )
    floor = policy.floor_of(measurement.name)
    if floor is not None and parse_version(measurement.version) < floor:
        raise AttestationRefused(
            f"component {measurement.name} {measurement.version} is below its security floor "
            f"{policy.floors[measurement.name]}",
            code="measurement_below_floor",
        )
