"""Device identity: the id is SHA-256 over the DER SubjectPublicKeyInfo of the identity key, in hex."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import StringConstraints

DEVICE_ID_PATTERN = r"^[0-9a-f]{64}$"
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN, min_length=64, max_length=64)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN, min_length=64, max_length=64)]

#: The identity and operational keys fleetward accepts: what TPMs, secure elements and HSMs all do.
SUPPORTED_CURVE = ec.SECP256R1


def public_key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of ``key``."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_sha256(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 over the DER SubjectPublicKeyInfo, lower-case hex."""
    return hashlib.sha256(public_key_der(key)).hexdigest()


def device_id_for(key: ec.EllipticCurvePublicKey) -> str:
    """The device id that ``key`` names."""
    return public_key_sha256(key)


def check_device_id(text: str) -> str:
    """Return ``text`` if it is a well-formed device id, else raise ``ValueError``."""
    if not isinstance(text, str):
        raise TypeError(f"a device id is a str, not {type(text).__name__}")
    if not _DEVICE_ID.fullmatch(text):  # fullmatch: "$" alone would let a trailing newline through
        raise ValueError("a device id is 64 lower-case hexadecimal characters")
    return text


#: A module id (a hub session of a module of the device, as IoT Hub and IoT Edge have them): a safe subset
#: of IoT Hub's, letters, digits and ``_ $ -``, with no ``.``, ``*`` or ``>`` (the bus's separators and
#: wildcards), so that ``$edgeAgent`` and ``fleetward-agent`` pass.
_MODULE_ID = re.compile(r"[A-Za-z0-9$][A-Za-z0-9_$-]{0,63}")


def check_module_id(module_id: str) -> str:
    """``module_id`` if it is a module id; ``ValueError`` otherwise (``TypeError`` for a non-str)."""
    if not isinstance(module_id, str):
        raise TypeError(f"a module id must be a str, not {type(module_id).__name__}")
    if not _MODULE_ID.fullmatch(module_id):
        raise ValueError(
            "a module id is 1 to 64 letters, digits or _$- and starts with a letter, a digit or $"
        )
    return module_id


def load_public_key(data: bytes | str) -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from PEM or DER, or raise ``ValueError`` saying why it is refused."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("the public key is not a valid PEM or DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, SUPPORTED_CURVE):
        raise ValueError("the public key must be an ECDSA P-256 key")
    return key
