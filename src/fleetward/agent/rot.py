"""Roots of trust: where a device's identity key lives and signs, without ever leaving.

There are two shapes of root of trust, and one function, :func:`attest`, that signs evidence with either:

- a :class:`RootOfTrust` signs any data with its identity key: :class:`SoftwareRootOfTrust` (a key file,
  development only) and PKCS#11 tokens. It signs the v1 evidence statement as it is;
- a :class:`QuotingRootOfTrust` cannot sign arbitrary data, only attest: a TPM 2.0 whose identity key is a
  restricted attestation key (``agent/tpm.py``). It quotes a PCR over the statement's hash instead.

Both name the device the same way: the SHA-256 of the identity key's DER SubjectPublicKeyInfo.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.errors import ConfigurationError
from fleetward.wire.evidence import AnyEvidence, Evidence
from fleetward.wire.identity import SUPPORTED_CURVE, device_id_for


class RootOfTrust(Protocol):
    """Holds the identity key; signs with it; never hands it out."""

    @property
    def development_only(self) -> bool: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``data``, DER-encoded."""
        ...


@dataclass(frozen=True)
class SignedEvidence:
    """Evidence in the form the root of trust produced, and the identity key's DER signature over it."""

    evidence: AnyEvidence
    signature: bytes


@runtime_checkable
class QuotingRootOfTrust(Protocol):
    """Holds an identity key that signs only what the root of trust itself attests (a TPM's quotes)."""

    @property
    def development_only(self) -> bool: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def attest(self, statement: Evidence) -> SignedEvidence:
        """``statement`` in the root's own form of evidence, signed by the identity key."""
        ...


#: Whatever holds a device's identity key.
AnyRootOfTrust = RootOfTrust | QuotingRootOfTrust


def attest(root_of_trust: AnyRootOfTrust, statement: Evidence) -> SignedEvidence:
    """Sign ``statement``: a quoting root quotes it, any other root signs the v1 statement as it is."""
    if isinstance(root_of_trust, QuotingRootOfTrust):
        return root_of_trust.attest(statement)
    return SignedEvidence(statement, root_of_trust.sign(statement.signed_message()))


def device_id_of(root_of_trust: AnyRootOfTrust) -> str:
    return device_id_for(root_of_trust.public_key())


class SoftwareRootOfTrust:
    """An identity key in a file of mode 0600.

    DEVELOPMENT ONLY: whoever can read the file can be the device.
    """

    development_only = True

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, SUPPORTED_CURVE):
            raise ConfigurationError("a software root of trust holds a P-256 key")
        self._key = key

    @classmethod
    def generate(cls) -> SoftwareRootOfTrust:
        """A fresh key in memory (simulated devices)."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, path: Path) -> SoftwareRootOfTrust:
        """The key in ``path``, created (mode 0600) if absent; refused if others may read it."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
            return cls(key)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigurationError(f"the identity key {path} is readable by others (mode {mode:o})")
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError:
            raise ConfigurationError(f"{path} does not hold a PEM private key") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{path} does not hold an EC private key")
        return cls(loaded)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
