"""Attestation nonces: stateless to issue, single-use to redeem.

A nonce is an authenticated token the authority can check without storing it::

    0x01 || expiry (8 bytes, Unix seconds, big-endian) || device id (32 bytes) || random (16 bytes)
         || HMAC-SHA256(nonce key, everything before)[:16]

encoded base64url without padding (98 characters). Issuing one costs no storage, so asking for nonces
cannot fill the database; redeeming one records its random part until it expires (the store's
``consumed_nonces``), so it is accepted once.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
from dataclasses import dataclass

from fleetward.errors import AttestationRefused

_VERSION = b"\x01"
_LENGTH = 1 + 8 + 32 + 16 + 16


@dataclass(frozen=True)
class Nonce:
    text: str
    nonce_id: str  # hex of the random part: what the store records when the nonce is redeemed
    device_id: str
    expires_at: dt.datetime


class NonceCodec:
    """Issues and opens nonces under one secret key (derived from the master key)."""

    def __init__(self, key: bytes, ttl: dt.timedelta) -> None:
        if len(key) < 32:
            raise ValueError("the nonce key must be at least 32 bytes")
        self._key = key
        self._ttl = ttl

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:16]

    def issue(self, device_id: str, now: dt.datetime, random: bytes | None = None) -> Nonce:
        expires_at = (now + self._ttl).replace(microsecond=0)
        rand = random if random is not None else os.urandom(16)
        body = _VERSION + int(expires_at.timestamp()).to_bytes(8, "big") + bytes.fromhex(device_id) + rand
        text = base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode("ascii")
        return Nonce(text, rand.hex(), device_id, expires_at)

    def open(self, text: str, device_id: str, now: dt.datetime) -> Nonce:
        """The nonce ``text`` if this authority issued it to ``device_id`` and it has not expired."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise AttestationRefused("the nonce is not base64url", code="nonce_malformed") from None
        if len(raw) != _LENGTH or raw[:1] != _VERSION:
            raise AttestationRefused("the nonce is not one this authority issues", code="nonce_malformed")
        body, mac = raw[:-16], raw[-16:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise AttestationRefused("the nonce was not issued by this authority", code="nonce_invalid")
        issued_to = body[9:41].hex()
        if issued_to != device_id:
            raise AttestationRefused("the nonce was issued to another device", code="nonce_wrong_device")
        expires_at = dt.datetime.fromtimestamp(int.from_bytes(body[1:9], "big"), dt.UTC)
        if now >= expires_at:
            raise AttestationRefused("the nonce has expired; ask for a new one", code="nonce_expired")
        return Nonce(text, body[41:57].hex(), issued_to, expires_at)
