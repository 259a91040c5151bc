"""A root of trust on a PKCS#11 token: a secure element, an HSM, or SoftHSM2 in tests.

The identity key is an EC P-256 key pair generated on the token (``CKA_TOKEN``, ``CKA_SENSITIVE``, not
``CKA_EXTRACTABLE``): the private half never leaves it, the agent only asks the token to sign. Signing is
``CKM_ECDSA`` over the SHA-256 digest; the token answers raw ``r || s``, which becomes the DER signature
the rest of fleetward expects.

Each operation opens a session, logs in, does its work and closes the session again (logging out). A lock
serializes the operations: a module initialised without locking callbacks (python-pkcs11 passes none) may
not be entered from two threads at once, and the login state of a token is shared by every session of the
process. Hold one :class:`Pkcs11RootOfTrust` per token in a process.

The user PIN comes from an environment variable or a file (:class:`UserPin`); it appears in no message,
no log and no ``repr``. python-pkcs11's exceptions stay in this module: what the operator must fix is a
:class:`ConfigurationError`, what may pass (a token removed, a device error) a :class:`TransportError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from fleetward.errors import ConfigurationError, FleetwardError, TransportError

#: Where Debian's softhsm2 package puts the module (the module the tests use).
SOFTHSM2_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
DEFAULT_PIN_VARIABLE = "FLEETWARD_PKCS11_PIN"

_P256_PARAMETERS = encode_named_curve_parameters("secp256r1")
_POINT_BYTES = 65  # an uncompressed P-256 point: 0x04 || X || Y


class UserPin:
    """The token's user PIN: read from an environment variable or a file, and never shown."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a PIN is a str")
        if not value:
            raise ValueError("a PIN cannot be empty")
        self._value = value

    @classmethod
    def from_environment(cls, variable: str = DEFAULT_PIN_VARIABLE) -> UserPin:
        value = os.environ.get(variable, "")
        if not value:
            raise ConfigurationError(
                f"the PKCS#11 user PIN is not set: put it in ${variable}", code="pkcs11_pin_missing"
            )
        return cls(value)

    @classmethod
    def from_file(cls, path: Path) -> UserPin:
        """The first line of ``path``; refused if others may read the file."""
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigurationError(
                f"cannot read the PKCS#11 PIN file {path}: {type(error).__name__}", code="pkcs11_pin_missing"
            ) from None
        if mode & 0o077:
            raise ConfigurationError(
                f"the PKCS#11 PIN file {path} is readable by others (mode {mode:o})",
                code="pkcs11_pin_exposed",
            )
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ConfigurationError(f"the PKCS#11 PIN file {path} is empty", code="pkcs11_pin_missing")
        return cls(lines[0])

    def reveal(self) -> str:
        """The PIN itself, for the module's login only."""
        return self._value

    def __repr__(self) -> str:
        return "UserPin(<hidden>)"

    __str__ = __repr__


class Pkcs11RootOfTrust:
    """An identity key that lives on a PKCS#11 token; implements :class:`~fleetward.agent.rot.RootOfTrust`."""

    development_only = False

    def __init__(
        self,
        token: pkcs11.Token,
        *,
        module: Path,
        key_label: str,
        pin: UserPin,
        public_key: ec.EllipticCurvePublicKey,
    ) -> None:
        self._token = token
        self._module = module
        self._key_label = key_label
        self._pin = pin
        self._public_key = public_key
        self._lock = threading.Lock()

    @classmethod
    def open_or_create(
        cls, module: Path, token_label: str, key_label: str, pin: UserPin
    ) -> Pkcs11RootOfTrust:
        """The key pair labelled ``key_label`` on the token ``token_label``, generated there if absent.

        Raises :class:`ConfigurationError` when the module does not load, no token carries that label, the
        PIN is refused, or the key labelled so is not a sensitive, non-extractable EC P-256 key pair.
        """
        if not key_label:
            raise ValueError("a key label cannot be empty")
        token = _open_token(module, token_label)
        with _session(token, pin, token_label, rw=True) as session:
            objects = _labelled(session, key_label)
            if not objects:
                public, _private = _generate(session, key_label)
            else:
                public = _check_pair(objects, key_label, token_label)
            public_key = _public_key_of(public, key_label)
        return cls(token, module=module, key_label=key_label, pin=pin, public_key=public_key)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 over SHA-256 of ``data``, DER-encoded: hashed here, the digest signed on the token."""
        digest = hashlib.sha256(data).digest()
        with self._lock, _session(self._token, self._pin, self._token.label) as session:
            private = _find(session, ObjectClass.PRIVATE_KEY, self._key_label)
            if private is None:
                raise ConfigurationError(
                    f"the key {self._key_label!r} is gone from the token {self._token.label!r}",
                    code="pkcs11_key_missing",
                )
            try:
                raw = private.sign(digest, mechanism=Mechanism.ECDSA)
            except pkcs11.PKCS11Error as error:
                raise _translated(error, f"signing with {self._key_label!r}") from None
        signature = encode_ecdsa_signature(raw)
        try:  # a key replaced under the same label, or a faulty signature, never leaves the device
            self._public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ConfigurationError(
                f"the key {self._key_label!r} on the token {self._token.label!r} no longer signs for the "
                "identity key the device id names",
                code="pkcs11_key_changed",
            ) from None
        return signature

    def __repr__(self) -> str:
        return (
            f"Pkcs11RootOfTrust(module={str(self._module)!r}, token={self._token.label!r}, "
            f"key={self._key_label!r})"
        )


# ------------------------------------------------------------------------------------------- the module


def _open_token(module: Path, token_label: str) -> pkcs11.Token:
    if not module.is_file():
        raise ConfigurationError(f"the PKCS#11 module {module} does not exist", code="pkcs11_module_missing")
    try:
        library = pkcs11.lib(str(module))
    except pkcs11.PKCS11Error as error:
        raise ConfigurationError(
            f"the PKCS#11 module {module} cannot be loaded: {error}", code="pkcs11_module_missing"
        ) from None
    try:
        tokens = list(library.get_tokens(token_label=token_label))
        if len(tokens) == 1:
            return tokens[0]
        seen = sorted({token.label for token in library.get_tokens() if token.label})
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"listing the tokens of {module}") from None
    if tokens:
        raise ConfigurationError(
            f"{len(tokens)} tokens are labelled {token_label!r} in {module}", code="pkcs11_token_ambiguous"
        )
    raise ConfigurationError(
        f"no PKCS#11 token labelled {token_label!r} in {module} (tokens: {', '.join(seen) or 'none'}); "
        "a token initialised after the module was loaded appears only when the process restarts",
        code="pkcs11_token_not_found",
    )


@contextmanager
def _session(token: pkcs11.Token, pin: UserPin, token_label: str, *, rw: bool = False) -> Iterator[Any]:
    """A logged-in session, closed (and logged out) on the way out."""
    try:
        session = token.open(rw=rw, user_pin=pin.reveal())
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"logging in to the token {token_label!r}") from None
    try:
        yield session
    finally:
        with contextlib.suppress(pkcs11.PKCS11Error):  # a token pulled mid-operation: nothing to close
            session.close()


def _labelled(session: Any, label: str) -> list[Any]:
    try:
        return list(session.get_objects({Attribute.LABEL: label}))
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"searching for {label!r}") from None


def _find(session: Any, object_class: ObjectClass, label: str) -> Any:
    try:
        found = list(session.get_objects({Attribute.LABEL: label, Attribute.CLASS: object_class}))
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"searching for {label!r}") from None
    if len(found) > 1:
        raise ConfigurationError(f"several keys are labelled {label!r}", code="pkcs11_key_ambiguous")
    return found[0] if found else None


def _generate(session: Any, label: str) -> tuple[Any, Any]:
    """A P-256 key pair on the token: the private half sensitive, not extractable, for signing only."""
    try:
        pair: tuple[Any, Any] = session.generate_keypair(
            KeyType.EC,
            store=True,
            label=label,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.EC_PARAMS: _P256_PARAMETERS, Attribute.TOKEN: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"generating the key {label!r}") from None
    return pair


def _check_pair(objects: list[Any], label: str, token_label: str) -> Any:
    """The public half of the key pair labelled ``label``, once both halves are what a root of trust needs."""
    by_class: dict[ObjectClass, list[Any]] = {}
    try:
        for item in objects:
            by_class.setdefault(item[Attribute.CLASS], []).append(item)
        privates = by_class.get(ObjectClass.PRIVATE_KEY, [])
        publics = by_class.get(ObjectClass.PUBLIC_KEY, [])
        if len(privates) > 1 or len(publics) > 1:
            raise ConfigurationError(
                f"several keys are labelled {label!r} on the token {token_label!r}",
                code="pkcs11_key_ambiguous",
            )
        if not privates or not publics:
            other = ", ".join(sorted(kind.name for kind in by_class)) or "nothing"
            raise ConfigurationError(
                f"{label!r} on the token {token_label!r} is not a key pair (found: {other})",
                code="pkcs11_key_wrong_type",
            )
        private, public = privates[0], publics[0]
        for item in (private, public):
            if item[Attribute.KEY_TYPE] != KeyType.EC or bytes(item[Attribute.EC_PARAMS]) != _P256_PARAMETERS:
                kind = item[Attribute.KEY_TYPE]
                name = kind.name if isinstance(kind, KeyType) else str(kind)
                raise ConfigurationError(
                    f"the key {label!r} on the token {token_label!r} is {name}, not EC P-256",
                    code="pkcs11_key_wrong_type",
                )
        if not private[Attribute.SENSITIVE] or private[Attribute.EXTRACTABLE]:
            raise ConfigurationError(
                f"the key {label!r} on the token {token_label!r} can leave the token "
                "(it must be sensitive and not extractable)",
                code="pkcs11_key_extractable",
            )
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"reading the key {label!r}") from None
    return public


def _public_key_of(public: Any, label: str) -> ec.EllipticCurvePublicKey:
    """The key for ``CKA_EC_POINT``: a DER OCTET STRING around the point, or (some tokens) the bare point."""
    try:
        point = bytes(public[Attribute.EC_POINT])
    except pkcs11.PKCS11Error as error:
        raise _translated(error, f"reading the public key {label!r}") from None
    if len(point) == _POINT_BYTES + 2 and point[:2] == bytes((0x04, _POINT_BYTES)):
        point = point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise ConfigurationError(
            f"the public key {label!r} is not a P-256 point", code="pkcs11_key_wrong_type"
        ) from None


_PIN_ERRORS: dict[type[pkcs11.PKCS11Error], tuple[str, str]] = {
    pkcs11.PinIncorrect: ("the token refused the PIN", "pkcs11_pin_incorrect"),
    pkcs11.PinInvalid: ("the token refused the PIN", "pkcs11_pin_incorrect"),
    pkcs11.PinLenRange: ("the token refused the PIN", "pkcs11_pin_incorrect"),
    pkcs11.PinLocked: ("the PIN is locked (too many wrong tries)", "pkcs11_pin_locked"),
    pkcs11.PinExpired: ("the PIN has expired", "pkcs11_pin_expired"),
    pkcs11.UserPinNotInitialized: ("the token has no user PIN yet", "pkcs11_pin_missing"),
}
_GONE = (
    pkcs11.DeviceRemoved,
    pkcs11.DeviceError,
    pkcs11.DeviceMemory,
    pkcs11.TokenNotPresent,
    pkcs11.SessionClosed,
    pkcs11.SessionHandleInvalid,
    pkcs11.SessionCount,
    pkcs11.FunctionFailed,
    pkcs11.GeneralError,
    pkcs11.HostMemory,
)


def _translated(error: pkcs11.PKCS11Error, doing: str) -> FleetwardError:
    """The fleetward error for a module's ``error`` while ``doing`` (the message names no PIN)."""
    for kind, (message, code) in _PIN_ERRORS.items():
        if isinstance(error, kind):
            return ConfigurationError(f"{message} while {doing}", code=code)
    if isinstance(error, _GONE):
        return TransportError(
            f"the PKCS#11 token failed while {doing}: {type(error).__name__}", code="pkcs11_unavailable"
        )
    return ConfigurationError(
        f"the PKCS#11 module refused {doing}: {type(error).__name__}", code="pkcs11_failed"
    )
