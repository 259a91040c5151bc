"""Roots of trust: where a device's identity key lives and signs, without ever leaving.

Only :class:`SoftwareRootOfTrust` exists for now, and it is for development: its key is a file. TPM 2.0
and PKCS#11 roots of trust implement the same protocol (the agent issue brings them).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.errors import ConfigurationError
from fleetward.wire.identity import SUPPORTED_CURVE, device_id_for


class RootOfTrust(Protocol):
    """Holds the identity key; signs with it; never hands it out."""

    @property
    def development_only(self) -> bool: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``data``, DER-encoded."""
        ...


def device_id_of(root_of_trust: RootOfTrust) -> str:
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
