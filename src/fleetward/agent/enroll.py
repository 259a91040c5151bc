"""The enrollment client: ask for a nonce, attest, and earn (or renew) the operational certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ValidationError

from fleetward.agent.rot import AnyRootOfTrust, attest, device_id_of
from fleetward.errors import TransportError
from fleetward.transport import check, network_error
from fleetward.wire.evidence import (
    EnrollmentRequest,
    EnrollmentResponse,
    Evidence,
    Measurement,
    NonceResponse,
)
from fleetward.wire.identity import public_key_sha256

Answer = TypeVar("Answer", bound=BaseModel)


@dataclass(frozen=True)
class OperationalCredential:
    """The operational key and the certificate the authority issued for it."""

    key: ec.EllipticCurvePrivateKey
    issued: EnrollmentResponse

    @property
    def not_after(self) -> dt.datetime:
        return self.issued.not_after

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def build_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """A PKCS#10 request for ``key``; the authority sets the subject itself, CN = device id here."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def build_enrollment(
    root_of_trust: AnyRootOfTrust, nonce: str, csr_pem: str, measurements: tuple[Measurement, ...]
) -> EnrollmentRequest:
    """Evidence over ``nonce``, the CSR's key and the log, signed (or quoted) by the identity key."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    csr_key = csr.public_key()
    if not isinstance(csr_key, ec.EllipticCurvePublicKey):
        raise TypeError("the CSR must carry an EC key")
    evidence = Evidence(
        device_id=device_id_of(root_of_trust),
        nonce=nonce,
        csr_key_sha256=public_key_sha256(csr_key),
        measurements=measurements,
    )
    signed = attest(root_of_trust, evidence)
    return EnrollmentRequest(evidence=signed.evidence, signature=signed.signature, csr=csr_pem)


def renewal_time(issued: EnrollmentResponse, rng: random.Random | None = None) -> dt.datetime:
    """When to renew: from half-life, plus up to a tenth of the validity of jitter so a fleet spreads out."""
    rng = rng or random.SystemRandom()
    validity = issued.not_after - issued.not_before
    return issued.renew_after + validity * (rng.random() / 10)


class EnrollmentClient:
    """Talks to the authority for one device."""

    def __init__(
        self,
        base_url: str,
        root_of_trust: AnyRootOfTrust,
        *,
        http: httpx.AsyncClient | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._url = base_url.rstrip("/")
        self._rot = root_of_trust
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_seconds)

    async def __aenter__(self) -> EnrollmentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._owns_http:
            await self._http.aclose()

    @property
    def device_id(self) -> str:
        return device_id_of(self._rot)

    async def nonce(self) -> NonceResponse:
        response = await self._post("/v1/attestation/nonce", {"device_id": self.device_id})
        return _answer(NonceResponse, response)

    async def enroll(
        self,
        measurements: tuple[Measurement, ...],
        operational_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> OperationalCredential:
        """Attest and earn a certificate for ``operational_key`` (a new P-256 key if none).

        Renewal is the same call. Refusals raise :class:`AttestationRefused` with the authority's code.
        """
        key = operational_key or ec.generate_private_key(ec.SECP256R1())
        challenge = await self.nonce()
        # A TPM or a token takes milliseconds to sign: not on the event loop.
        request = await asyncio.to_thread(
            build_enrollment, self._rot, challenge.nonce, build_csr(key, self.device_id), measurements
        )
        response = await self._post("/v1/attestation/certificate", request.wire_dict())
        return OperationalCredential(key=key, issued=_answer(EnrollmentResponse, response))

    async def _post(self, path: str, body: dict[str, object]) -> httpx.Response:
        url = self._url + path
        try:
            response = await self._http.post(url, json=body)
        except httpx.HTTPError as error:
            raise network_error(error, url) from None
        return check(response)


def _answer(model: type[Answer], response: httpx.Response) -> Answer:
    """The authority's answer, or a retryable error if it is not what the wire format says."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError:
        raise TransportError(
            f"the authority's answer to {response.request.url.path} is not a valid {model.__name__}",
            code="authority_answer_malformed",
        ) from None
