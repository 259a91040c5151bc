"""A TPM 2.0 root of trust: the identity key is a restricted attestation key that never leaves the TPM.

The identity key is an ECC P-256 signing key with the attributes of an attestation key: ``fixedTPM``,
``fixedParent``, ``sensitiveDataOrigin`` (made inside, never outside, and it cannot be duplicated),
``userWithAuth`` (empty authorisation), ``restricted`` and ``sign``. A restricted key signs only what
the TPM made or hashed itself, and never anything that could pass for a quote; it refuses a digest handed
to it. So this root of trust does not
``sign``; it :meth:`TpmRootOfTrust.attest` s, by quoting one PCR with qualifying data SHA-256 of the
evidence statement (``wire/evidence.py``). It lives under the primary storage key of the owner hierarchy.

**How the key persists.** The TPM wraps the key's private part with its parent, the owner hierarchy's
primary storage key; that wrapped blob and the public area are saved in a ``TSS2 PRIVATE KEY`` PEM file
(the format of tpm2-openssl, tpm2-tss-engine and tpm2-pytss' ``TSSPrivKey``, mode 0600). The primary is
not stored: it is derived again, each time it is needed, from the owner seed and the standard ECC P-256
storage key template (TCG's, the one ``TSSPrivKey`` uses), and the blob is loaded under it. This was
chosen over ``TPM2_EvictControl`` to a persistent handle because it writes nothing to the TPM's NV memory
(persistent handles are few, often 7, and shared with whatever else uses the TPM: disk encryption, other
agents), it cannot collide with another program's handle, and a ``tpm2_clear`` ends the identity the same
way in both designs (it changes the owner seed). The blob loads in this TPM only, but there anyone who
can read the file and reach the TPM can use the key (its authorisation is empty): hence mode 0600. Losing
the file loses the identity; creating another key makes a new device id, which an operator claims again.

**Measurements.** Each launched component is extended into one SHA-256 PCR, in launch order
(:meth:`TpmRootOfTrust.extend`), after :meth:`TpmRootOfTrust.reset_measurements` at the start of the
launch sequence, so that the PCR holds the measurement log digest. The PCR is configurable among the two
an application may reset at locality 0: 23, the application PCR (the default), or 16, the debug PCR
(tests and development; a verifier of platform PCRs may ignore it). Being resettable is what lets the log
start from zeros after every agent start; it also means anyone with access to the TPM may reset and
extend it, so a quote over them proves the identity of the device and the binding of the statement, not
a launch measured by firmware (docs/adr/0009).

**Connections.** Each operation opens its own connection through an explicit TCTI (``swtpm:host=…,
port=…``, ``device:/dev/tpmrm0``, ``tabrmd``…), never the TSS' default list, which may reach another TPM.
Every transient object (the primary, the loaded key) is flushed in a ``finally``: without a resource
manager a TPM keeps them, and swtpm has three slots.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_HA,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_HA,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from fleetward.agent.rot import SignedEvidence
from fleetward.errors import ConfigurationError, FleetwardError, TransportError
from fleetward.wire.evidence import QUOTABLE_PCRS, Evidence, Measurement, QuotablePcr, TpmQuoteEvidence

#: The application PCR (TCG PC Client: resettable and extendable at locality 0): the default on devices.
APPLICATION_PCR: QuotablePcr = 23
#: The debug PCR (also resettable at locality 0): tests and development.
DEBUG_PCR: QuotablePcr = 16

#: TCTIs that reach a TPM simulator rather than a chip: a root of trust through them is for development.
SIMULATOR_TCTIS = frozenset({"swtpm", "mssim"})

#: The attributes that make the identity key an attestation key that cannot leave the TPM.
IDENTITY_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)

_TCTI_LAYER = 0x0A0000
_RC_FORMAT_ONE = 0x080
_RC_WARNING = 0x900


def _storage_key_template() -> Any:
    """The owner hierarchy's primary storage key: TCG's ECC P-256 template, as ``TSSPrivKey`` uses it."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.DECRYPT
            | TPMA_OBJECT.NODA
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN,
            authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(
                        algorithm=TPM2_ALG.AES,
                        keyBits=TPMU_SYM_KEY_BITS(aes=128),
                        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                    ),
                    scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


def _identity_key_template() -> Any:
    """A restricted ECDSA P-256 / SHA-256 signing key: an attestation key."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=IDENTITY_KEY_ATTRIBUTES,
            authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=TPMT_ECC_SCHEME(
                        scheme=TPM2_ALG.ECDSA,
                        details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
                    ),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


def public_key_of(public: Any) -> ec.EllipticCurvePublicKey:
    """The P-256 key of a ``TPM2B_PUBLIC``, as pyca/cryptography has it (and the device id hashes it)."""
    area = public.publicArea
    if area.type != TPM2_ALG.ECC or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise ConfigurationError("the TPM identity key is not an ECC P-256 key")
    x = int.from_bytes(bytes(area.unique.ecc.x), "big")
    y = int.from_bytes(bytes(area.unique.ecc.y), "big")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise ConfigurationError("the TPM identity key is not a point of P-256") from None


def parse_tcti(tcti: str) -> tuple[str, str | None]:
    """``"name:configuration"`` or ``"name"`` as tpm2-tools write it; an empty name is refused."""
    if not isinstance(tcti, str):
        raise TypeError(f"a TCTI is a str, not {type(tcti).__name__}")
    name, _, configuration = tcti.partition(":")
    if not name.strip() or name != name.strip():
        raise ConfigurationError(
            "name the TPM's TCTI explicitly, such as 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321'"
        )
    return name, configuration or None


class _Tpm:
    """One TPM behind an explicit TCTI: a connection per operation, one at a time, TSS errors translated."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.name, self._configuration = parse_tcti(tcti)
        # Without a resource manager (/dev/tpm0, swtpm) a TPM takes one connection and has few object slots.
        self._lock = threading.Lock()

    @contextmanager
    def session(self, doing: str) -> Iterator[Any]:
        """An ESAPI context on a connection of its own, closed on the way out."""
        with self._lock:
            try:
                tcti = TCTILdr(self.name, self._configuration)
            except TSS2_Exception as error:
                raise _translated(error, doing, self.tcti) from None
            try:
                esapi = ESAPI(tcti)
                try:
                    yield esapi
                finally:
                    esapi.close()
            except TSS2_Exception as error:
                raise _translated(error, doing, self.tcti) from None
            finally:
                tcti.close()


def _primary(esapi: Any) -> Any:
    """The owner hierarchy's storage key, derived again from the owner seed; the caller flushes it."""
    primary, _, _, _, _ = esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), _storage_key_template(), ESYS_TR.OWNER
    )
    return primary


def create_identity_key(tcti: str) -> TSSPrivKey:
    """A new identity key, made by the TPM under the owner hierarchy's storage key (not saved)."""
    with _Tpm(tcti).session("create the identity key") as esapi:
        primary = _primary(esapi)
        try:
            private, public, _, _, _ = esapi.create(
                primary, TPM2B_SENSITIVE_CREATE(), _identity_key_template()
            )
        finally:
            esapi.flush_context(primary)
    return TSSPrivKey(private, public, empty_auth=True)


class TpmRootOfTrust:
    """An identity key in a TPM 2.0, reached through an explicit TCTI; evidence is a quote of one PCR."""

    def __init__(self, tcti: str, key: TSSPrivKey, *, pcr_index: QuotablePcr = APPLICATION_PCR) -> None:
        _check_pcr(pcr_index)
        attributes = int(key.public.publicArea.objectAttributes)
        if attributes != int(IDENTITY_KEY_ATTRIBUTES):
            raise ConfigurationError(
                "the TPM key is not a restricted attestation key that cannot leave the TPM"
            )
        self._tpm = _Tpm(tcti)
        self._key = key
        self._pcr_index: QuotablePcr = pcr_index
        self._public_key = public_key_of(key.public)

    @classmethod
    def load_or_create(
        cls, tcti: str, key_file: Path, *, pcr_index: QuotablePcr = APPLICATION_PCR
    ) -> TpmRootOfTrust:
        """The identity key saved in ``key_file``, created in the TPM (and saved, mode 0600) if absent.

        An existing key is loaded once to check that it belongs to this TPM; refused if others may
        read the file or the key does not load.
        """
        _check_pcr(pcr_index)
        if not key_file.exists():
            key = create_identity_key(tcti)
            root = cls(tcti, key, pcr_index=pcr_index)
            key_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(key.to_pem())
            return root
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(f"the TPM key file {key_file} is readable by others (mode {mode:o})")
        try:
            key = TSSPrivKey.from_pem(key_file.read_bytes())
        except (ValueError, TypeError, TSS2_Exception):
            raise ConfigurationError(f"{key_file} does not hold a TSS2 PRIVATE KEY") from None
        root = cls(tcti, key, pcr_index=pcr_index)
        with root._tpm.session("load the identity key") as esapi:
            esapi.flush_context(root._load(esapi))
        return root

    @property
    def development_only(self) -> bool:
        """True through a simulator's TCTI: whoever reads its state directory can be the device."""
        return self._tpm.name in SIMULATOR_TCTIS

    @property
    def tcti(self) -> str:
        return self._tpm.tcti

    @property
    def pcr_index(self) -> QuotablePcr:
        return self._pcr_index

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def reset_measurements(self) -> None:
        """Start a launch sequence: the PCR goes back to 32 zero bytes, where the log digest starts."""
        with self._tpm.session(f"reset PCR {self._pcr_index}") as esapi:
            esapi.pcr_reset(self._pcr_handle())

    def extend(self, measurement: Measurement) -> None:
        """Extend the PCR with a launched component's event digest, as the measurement log does."""
        digests = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=measurement.event_digest()))]
        )
        with self._tpm.session(f"extend PCR {self._pcr_index}") as esapi:
            esapi.pcr_extend(self._pcr_handle(), digests)

    def pcr_value(self) -> bytes:
        """What the PCR holds now: the log digest of what was extended since the last reset."""
        with self._tpm.session(f"read PCR {self._pcr_index}") as esapi:
            _, _, values = esapi.pcr_read(self._selection())
        return bytes(values[0])

    def attest(self, statement: Evidence) -> SignedEvidence:
        """Quote the PCR with qualifying data SHA-256(statement): TPM evidence and its DER signature."""
        with self._tpm.session("quote") as esapi:
            key = self._load(esapi)
            try:
                attested, signature = esapi.quote(
                    key, self._selection(), TPM2B_DATA(statement.statement_sha256())
                )
            finally:
                esapi.flush_context(key)
        if signature.sigAlg != TPM2_ALG.ECDSA:
            raise ConfigurationError("the TPM identity key did not sign its quote with ECDSA")
        der = encode_dss_signature(
            int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big"),
            int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big"),
        )
        evidence = TpmQuoteEvidence.of(statement, self._pcr_index, bytes(attested.attestationData))
        return SignedEvidence(evidence, der)

    def _pcr_handle(self) -> Any:
        return ESYS_TR.PCR23 if self._pcr_index == 23 else ESYS_TR.PCR16

    def _selection(self) -> Any:
        return TPML_PCR_SELECTION.parse(f"sha256:{self._pcr_index}")

    def _load(self, esapi: Any) -> Any:
        """The identity key, loaded under a fresh primary (flushed here); the caller flushes the key."""
        primary = _primary(esapi)
        try:
            return esapi.load(primary, self._key.private, self._key.public)
        finally:
            esapi.flush_context(primary)


def _check_pcr(pcr_index: int) -> None:
    if pcr_index not in QUOTABLE_PCRS:
        raise ConfigurationError(f"the measurement PCR is one of {QUOTABLE_PCRS}, not {pcr_index}")


def _translated(error: TSS2_Exception, doing: str, tcti: str) -> FleetwardError:
    """A TSS error as fleetward's: unreachable and busy are retryable, a refusal is not."""
    rc = int(error.rc)
    if rc & 0xFF0000 == _TCTI_LAYER:
        return TransportError(f"cannot reach the TPM at {tcti!r} to {doing}: {error}", code="tpm_unavailable")
    code = rc & 0xFFFF
    if not code & _RC_FORMAT_ONE and code & _RC_WARNING == _RC_WARNING:
        return TransportError(f"the TPM is busy and could not {doing}: {error}", code="tpm_busy")
    return ConfigurationError(f"the TPM refused to {doing}: {error}", code="tpm_refused")
