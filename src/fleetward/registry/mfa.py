"""Operator MFA: the pure core of time-based one-time passwords (TOTP, RFC 6238) and their sealed state.

A TOTP code is HOTP (RFC 4226: HMAC-SHA1 of a counter, dynamically truncated to 6 digits) with the
counter being the number of 30-second steps since the Unix epoch. A code is accepted in the current step
or ``window_steps`` either side (clock drift), and never for a step at or before the last one accepted:
a code seen once, or an older one, is a replay (RFC 6238 section 5.2).

The secret and the last step used are kept together, sealed (AES-256-GCM under a key derived from the
master key, the operator bound in as associated data), so that using a code re-seals the state and the
database never holds the secret in the clear. Nothing here does I/O; the registry service does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import quote, urlencode

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetward.errors import ConfigurationError

#: RFC 6238 defaults, which every authenticator app understands
STEP_SECONDS = 30
DIGITS = 6
SECRET_BYTES = 20  # the HMAC-SHA1 block of RFC 4226's recommendation (160 bits)
#: the most steps either side of now a caller may accept
MAX_WINDOW_STEPS = 10
#: a code longer than this (spaces included) is refused without being looked at
MAX_CODE_CHARS = 16
MAX_LABEL_CHARS = 256

_SEALED_MAGIC = b"fwm1"
_NONCE_BYTES = 12
_NO_STEP = -1


class MfaStatus(StrEnum):
    """An operator's MFA: none, enrolled but not yet confirmed with a first code, or on."""

    OFF = "off"
    PENDING = "pending"
    ON = "on"


@dataclass(frozen=True)
class TotpState:
    """What is sealed in the store: the secret and the last time step a code was accepted for."""

    secret: bytes = field(repr=False)
    last_used_step: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise TypeError("a TOTP secret is bytes")
        if not 16 <= len(self.secret) <= 64:
            raise ValueError("a TOTP secret is 16 to 64 bytes")
        if self.last_used_step is not None:
            if not isinstance(self.last_used_step, int) or isinstance(self.last_used_step, bool):
                raise TypeError("the last used step is an int")
            if self.last_used_step < 0:
                raise ValueError("the last used step is not negative")


@dataclass(frozen=True)
class MfaEnrollment:
    """What enrolment hands the operator, once: the secret for an authenticator app, two ways."""

    secret_base32: str = field(repr=False)
    otpauth_uri: str = field(repr=False)


def new_secret() -> bytes:
    """A fresh TOTP secret: 20 random bytes."""
    return secrets.token_bytes(SECRET_BYTES)


def base32_secret(secret: bytes) -> str:
    """The secret as authenticator apps take it: base32, without the ``=`` padding."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def _label_part(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"the {what} is text")
    if not text or len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"the {what} is 1 to {MAX_LABEL_CHARS} characters")
    if ":" in text or not text.isprintable():
        raise ValueError(f"the {what} may not contain ':' or control characters")
    return text


def otpauth_uri(secret: bytes, account: str, issuer: str) -> str:
    """The ``otpauth://totp/…`` URI (Google Authenticator's Key Uri Format) that enrols ``secret``."""
    label = (
        quote(_label_part(issuer, "issuer"), safe="") + ":" + quote(_label_part(account, "account"), safe="")
    )
    parameters = urlencode(
        {
            "secret": base32_secret(secret),
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": STEP_SECONDS,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{parameters}"


def time_step(now: dt.datetime) -> int:
    """The RFC 6238 counter at ``now``: whole 30-second steps since the Unix epoch."""
    if not isinstance(now, dt.datetime):
        raise TypeError("the time is a datetime")
    if now.tzinfo is None:
        raise ValueError("the time must be timezone-aware")
    seconds = int(now.timestamp() // 1)
    if seconds < 0:
        raise ValueError("the time is before the Unix epoch")
    return seconds // STEP_SECONDS


def hotp(secret: bytes, counter: int, digits: int = DIGITS) -> str:
    """The RFC 4226 one-time password of ``counter``: HMAC-SHA1, dynamic truncation, ``digits`` digits."""
    if not 6 <= digits <= 8:
        raise ValueError("a one-time password has 6 to 8 digits")
    if not 0 <= counter < 2**64:
        raise ValueError("the counter is an unsigned 64-bit number")
    digest = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    binary = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(binary % 10**digits).zfill(digits)


def totp(secret: bytes, now: dt.datetime, digits: int = DIGITS) -> str:
    """The code an authenticator app shows at ``now``."""
    return hotp(secret, time_step(now), digits)


def _normalised(code: str) -> str | None:
    """The code's digits (spaces, as apps show ``123 456``, removed), or ``None`` if it is not a code."""
    if not isinstance(code, str):
        raise TypeError("a one-time code is text")
    if len(code) > MAX_CODE_CHARS:
        return None
    digits = code.replace(" ", "")
    if len(digits) != DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return digits


def verify(
    secret: bytes,
    code: str,
    now: dt.datetime,
    *,
    window_steps: int = 1,
    last_used_step: int | None,
) -> int | None:
    """The time step ``code`` is valid for, or ``None``: wrong, malformed, out of the window, or a replay.

    Every step of the window is compared, in constant time, whether or not an earlier one matched; steps
    at or before ``last_used_step`` are not candidates.
    """
    if not 0 <= window_steps <= MAX_WINDOW_STEPS:
        raise ValueError(f"the window is 0 to {MAX_WINDOW_STEPS} steps")
    wanted = _normalised(code)
    if wanted is None:
        return None
    current = time_step(now)
    matched: int | None = None
    for step in range(max(0, current - window_steps), current + window_steps + 1):
        equal = hmac.compare_digest(hotp(secret, step).encode("ascii"), wanted.encode("ascii"))
        fresh = last_used_step is None or step > last_used_step
        if equal and fresh and matched is None:
            matched = step
    return matched


# ---------------------------------------------------------------------- the sealed state


def seal_state(key: bytes, state: TotpState, label: str) -> bytes:
    """``state`` encrypted under ``key`` (32 bytes), ``label`` (the operator) bound as associated data."""
    step = _NO_STEP if state.last_used_step is None else state.last_used_step
    plaintext = struct.pack(">B", len(state.secret)) + state.secret + struct.pack(">q", step)
    nonce = os.urandom(_NONCE_BYTES)
    return _SEALED_MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, label.encode())


def open_state(key: bytes, sealed: bytes, label: str) -> TotpState:
    """The state sealed by :func:`seal_state`; ``ConfigurationError`` if it does not open with ``key``."""
    header = len(_SEALED_MAGIC) + _NONCE_BYTES
    if not sealed.startswith(_SEALED_MAGIC) or len(sealed) < header + 16:
        raise ConfigurationError(f"the sealed MFA secret of {label!r} is not in a format fleetward knows")
    try:
        plaintext = AESGCM(key).decrypt(sealed[len(_SEALED_MAGIC) : header], sealed[header:], label.encode())
    except InvalidTag:
        raise ConfigurationError(
            f"the sealed MFA secret of {label!r} does not open with this master key"
        ) from None
    length = plaintext[0] if plaintext else 0
    if len(plaintext) != 1 + length + 8:
        raise ConfigurationError(f"the sealed MFA secret of {label!r} is damaged")
    (step,) = struct.unpack(">q", plaintext[1 + length :])
    try:
        return TotpState(plaintext[1 : 1 + length], None if step == _NO_STEP else step)
    except ValueError:
        raise ConfigurationError(f"the sealed MFA secret of {label!r} is damaged") from None
