"""Where the authority's private keys live: sealed at rest under a master key, never in the clear.

The master key is 32 random bytes kept outside the database: ``FLEETWARD_MASTER_KEY`` (base64, for
several nodes sharing one store) or a file of mode 0600 in the data directory (the embedded default).
Each sealed key is AES-256-GCM encrypted with a fresh nonce and its label (tenant and purpose) as
associated data, so a sealed key copied to another row or tenant does not open.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fleetward.errors import ConfigurationError

_SEALED_MAGIC = b"fwk1"
MASTER_KEY_BYTES = 32


class KeyStore(Protocol):
    """Seals private keys for storage and derives purpose-bound secrets."""

    def seal(self, key: ec.EllipticCurvePrivateKey, label: str) -> bytes: ...

    def unseal(self, sealed: bytes, label: str) -> ec.EllipticCurvePrivateKey: ...

    def derive(self, purpose: str) -> bytes: ...


class MasterKeyStore:
    """The default key store: AES-256-GCM under a master key held outside the database."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        self._seal_key = AESGCM(self._hkdf(master_key, b"fleetward seal v1"))
        self._master = master_key

    @staticmethod
    def _hkdf(master: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)

    def seal(self, key: ec.EllipticCurvePrivateKey, label: str) -> bytes:
        plaintext = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(12)
        return _SEALED_MAGIC + nonce + self._seal_key.encrypt(nonce, plaintext, label.encode())

    def unseal(self, sealed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
        if not sealed.startswith(_SEALED_MAGIC) or len(sealed) < len(_SEALED_MAGIC) + 12 + 16:
            raise ConfigurationError(f"the sealed key {label!r} is not in a format fleetward knows")
        nonce = sealed[4:16]
        try:
            plaintext = self._seal_key.decrypt(nonce, sealed[16:], label.encode())
        except InvalidTag:
            raise ConfigurationError(f"the sealed key {label!r} does not open with this master key") from None
        key = serialization.load_der_private_key(plaintext, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"the sealed key {label!r} is not an EC key")
        return key

    def derive(self, purpose: str) -> bytes:
        return self._hkdf(self._master, b"fleetward derive v1 " + purpose.encode())


def load_master_key(path: Path, environment_value: str | None = None, *, create: bool) -> bytes:
    """The master key from the environment value, else from ``path`` (created, mode 0600, if asked)."""
    if environment_value:
        try:
            key = base64.b64decode(environment_value, validate=True)
        except ValueError:
            raise ConfigurationError("FLEETWARD_MASTER_KEY is not valid base64") from None
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"FLEETWARD_MASTER_KEY must decode to {MASTER_KEY_BYTES} bytes")
        return key
    if not path.exists():
        if not create:
            raise ConfigurationError(
                f"no master key at {path}: run `fleetward init` or set FLEETWARD_MASTER_KEY"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(base64.b64encode(os.urandom(MASTER_KEY_BYTES)) + b"\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"the master key file {path} is readable by others (mode {mode:o}); chmod 600 it"
        )
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except ValueError:
        raise ConfigurationError(f"the master key file {path} is not valid base64") from None
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigurationError(f"the master key file {path} must hold {MASTER_KEY_BYTES} bytes")
    return key
