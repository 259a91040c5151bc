"""Who sends an update request: the device behind ``Authorization: FleetwardDevice serial=…,t=…,sig=…``.

The device's operational key signs its certificate's serial and the time (``wire.updates.device_token``).
The token is checked against the certificate fleetward issued for that serial: first its time and its
signature with the certificate's key (a serial no certificate has is refused as a bad signature is, so
that a request without the key learns nothing of a serial), then the certificate's standing: neither
revoked nor expired, its device active or quarantined (an update is how a quarantined device is
remediated). A revoked device stops updating at once, and the tenant of the request is the tenant of the
certificate (one tenant's device cannot read another's repository).

A device reuses one token for the few requests of one check, so a verified signature is remembered in a
small bounded LRU; the certificate's standing is read from the store on every request all the same.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, Request

from fleetward.clock import Clock
from fleetward.config import Limits
from fleetward.errors import Unauthenticated
from fleetward.registry.models import DeviceStatus
from fleetward.store.database import Database
from fleetward.store.schema import certificates, devices
from fleetward.wire.updates import DeviceToken

#: how many verified tokens each process remembers
VERIFIED_TOKENS = 4096
_MAY_UPDATE = frozenset({DeviceStatus.ACTIVE.value, DeviceStatus.QUARANTINED.value})


@dataclass(frozen=True)
class UpdateDevice:
    """An authenticated device, as its certificate and the registry describe it."""

    tenant_id: str
    device_id: str
    serial: str
    product_id: str | None
    group_id: str | None


class DeviceAuthenticator:
    """Checks device tokens against the certificates fleetward issued."""

    def __init__(
        self, database: Database, clock: Clock, limits: Limits, *, cache_size: int = VERIFIED_TOKENS
    ) -> None:
        self._db = database
        self._clock = clock
        self._max_age = limits.device_token_max_age_seconds
        self._cache_size = cache_size
        self._verified: OrderedDict[tuple[str, int, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        #: what a token for a serial no certificate has is verified against
        self._decoy = ec.generate_private_key(ec.SECP256R1()).public_key()

    def authenticate(self, header: str | None) -> UpdateDevice:
        """The device behind an ``Authorization`` header; ``Unauthenticated`` (401) otherwise."""
        if header is None:
            raise Unauthenticated("an update request needs a FleetwardDevice token", code="token_missing")
        token = DeviceToken.parse(header)
        now = self._clock.now()
        seconds = int(now.timestamp())
        if abs(seconds - token.issued_at) > self._max_age:
            raise Unauthenticated("the device token is too old or from the future", code="token_expired")
        with self._db.read() as connection:
            row = connection.execute(
                sa.select(
                    certificates.c.tenant_id,
                    certificates.c.device_id,
                    certificates.c.der,
                    certificates.c.not_before,
                    certificates.c.not_after,
                    certificates.c.revoked_at,
                    devices.c.status,
                    devices.c.tenant_id.label("device_tenant_id"),
                    devices.c.product_id,
                    devices.c.group_id,
                )
                .join(devices, devices.c.id == certificates.c.device_id)
                .where(certificates.c.serial == token.serial)
            ).first()
        # the signature first: only the holder of the certificate's key learns its standing, and an
        # unknown serial is refused exactly as a bad signature is
        if row is None:
            # verified all the same (against a key nobody holds), so that the time taken does not tell
            token.verify(self._decoy, seconds, self._max_age)
            raise _invalid()
        key = (token.serial, token.issued_at, token.signature)
        if not self._remembered(key):
            public_key = x509.load_der_x509_certificate(bytes(row.der)).public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise _invalid()
            token.verify(public_key, seconds, self._max_age)
            self._remember(key)
        if row.revoked_at is not None:
            raise Unauthenticated("the device's certificate is revoked", code="certificate_revoked")
        if not row.not_before <= now < row.not_after:
            raise Unauthenticated("the device's certificate is not valid now", code="certificate_expired")
        # a quarantined device may still update: an update is how it is remediated
        if row.status not in _MAY_UPDATE or row.device_tenant_id != row.tenant_id:
            raise Unauthenticated(f"the device is {row.status}, not active", code="device_not_active")
        return UpdateDevice(
            tenant_id=row.tenant_id,
            device_id=row.device_id,
            serial=token.serial,
            product_id=row.product_id,
            group_id=row.group_id,
        )

    def _remembered(self, key: tuple[str, int, bytes]) -> bool:
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
            return False

    def _remember(self, key: tuple[str, int, bytes]) -> None:
        with self._lock:
            self._verified[key] = None
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)


def _invalid() -> Unauthenticated:
    """What a token whose signature does not verify gets, whether or not a certificate has its serial."""
    return Unauthenticated("the device token's signature is not valid", code="token_invalid")


def authenticated_device(request: Request) -> UpdateDevice:
    """FastAPI dependency: the device behind the request's token (401 without a valid one)."""
    authenticator: DeviceAuthenticator = request.app.state.device_authenticator
    return authenticator.authenticate(request.headers.get("authorization"))


DeviceDep = Annotated[UpdateDevice, Depends(authenticated_device)]
