"""The pure parts of an MQTT session: who a certificate says the device is, whether its CONNECT agrees,
its outbound QoS 1 window, and its rate limit. No sockets; time is passed in.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from fleetward.authority.ca import parse_device_uri
from fleetward.errors import AccessRefused, ProtocolViolation
from fleetward.hub.codec import Connect, ConnectReturnCode
from fleetward.wire.identity import check_device_id, check_module_id

Token = TypeVar("Token")


class SessionKey(NamedTuple):
    """What a hub session is: a device (``module_id`` None), or one module of it. Each is independent."""

    device_id: str
    module_id: str | None = None

    def __str__(self) -> str:
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"


@dataclass(frozen=True)
class PeerIdentity:
    """Who the client certificate names, once it is known to chain to that tenant's issuing CA."""

    tenant_id: str
    device_id: str
    serial: str
    not_after: dt.datetime


def identify(
    certificate_der: bytes, issuing_cas: dict[str, x509.Certificate], now: dt.datetime
) -> PeerIdentity:
    """The identity in a client certificate: CN and URI SAN agree, the tenant's issuing CA signed it.

    TLS has already checked the chain to some tenant's root; this binds the certificate to the tenant it
    names, so that no tenant's CA can speak for another tenant's device.
    """
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, x509.ExtensionNotFound):
        raise AccessRefused(
            "the client certificate is not an operational certificate", code="certificate_unknown"
        ) from None
    if len(uris) != 1 or len(common_names) != 1:
        raise AccessRefused("the client certificate does not name one device", code="certificate_unknown")
    try:
        tenant_id, device_id = parse_device_uri(uris[0])
        check_device_id(device_id)
    except ValueError:
        raise AccessRefused(
            "the client certificate does not name a device", code="certificate_unknown"
        ) from None
    if common_names[0].value != device_id:
        raise AccessRefused(
            "the certificate's common name and device URI disagree", code="certificate_unknown"
        )
    issuer = issuing_cas.get(tenant_id)
    if issuer is None:
        raise AccessRefused(
            "the certificate names a tenant this hub does not know", code="certificate_unknown"
        )
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise AccessRefused(
            "the certificate was not issued by its tenant's issuing CA", code="certificate_wrong_tenant"
        ) from None
    if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
        raise AccessRefused("the certificate is not valid now", code="certificate_expired")
    return PeerIdentity(
        tenant_id, device_id, f"{certificate.serial_number:x}", certificate.not_valid_after_utc
    )


class ConnectRefused(AccessRefused):
    """A CONNECT the hub answers with a refusal code before it closes the connection."""

    def __init__(self, message: str, *, code: str, return_code: ConnectReturnCode) -> None:
        super().__init__(message, code=code)
        self.return_code = return_code


def check_connect(connect: Connect, identity: PeerIdentity, max_keep_alive_seconds: int) -> int:
    """The keep-alive to hold the device to, if its CONNECT agrees with its certificate."""
    return check_session(connect, identity, max_keep_alive_seconds)[0]


def check_session(
    connect: Connect, identity: PeerIdentity, max_keep_alive_seconds: int
) -> tuple[int, SessionKey]:
    """The keep-alive and the session (the device, or a module of it) of a CONNECT, if it agrees with its
    certificate. The certificate names the device; any module of the device may connect with it."""
    if connect.protocol_level not in (3, 4):
        raise ConnectRefused(
            f"MQTT protocol level {connect.protocol_level} is not spoken here; use MQTT 3.1.1",
            code="protocol_version",
            return_code=ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
        )
    key = _session_key(connect.client_id, identity.device_id)
    if connect.username is not None and not _username_names(connect.username, key):
        raise ConnectRefused(
            "the user name must be {hub host}/{device id}/[{module id}/]?api-version=… for this session",
            code="username_mismatch",
            return_code=ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
        )
    if connect.will is not None:
        raise ConnectRefused(
            "will messages are not supported (as in IoT Hub)",
            code="will_refused",
            return_code=ConnectReturnCode.NOT_AUTHORIZED,
        )
    if connect.keep_alive == 0 or connect.keep_alive > max_keep_alive_seconds:
        return max_keep_alive_seconds, key
    return connect.keep_alive, key


def _session_key(client_id: str, device_id: str) -> SessionKey:
    """``{device id}`` or ``{device id}/{module id}``, for the certificate's device."""
    named, separator, module_id = client_id.partition("/")
    if named != device_id:
        raise ConnectRefused(
            "the MQTT client id must be the device id of the certificate (or {device id}/{module id})",
            code="client_id_mismatch",
            return_code=ConnectReturnCode.IDENTIFIER_REJECTED,
        )
    if not separator:
        return SessionKey(device_id)
    try:
        return SessionKey(device_id, check_module_id(module_id))
    except ValueError as error:
        raise ConnectRefused(
            f"the client id's module id is refused: {error}",
            code="module_id_invalid",
            return_code=ConnectReturnCode.IDENTIFIER_REJECTED,
        ) from None


def _username_names(username: str, key: SessionKey) -> bool:
    """The IoT Hub form ``{host}/{device id}/?api-version=…`` (or without the query) for a device,
    ``{host}/{device id}/{module id}/?api-version=…`` for a module."""
    parts = username.split("/")
    if len(username) > 1024 or len(parts) < 2 or unquote(parts[1]) != key.device_id:
        return False
    named = unquote(parts[2]) if len(parts) > 2 and not parts[2].startswith("?") else ""
    return named == (key.module_id or "")


@dataclass
class OutboundWindow(Generic[Token]):
    """QoS 1 messages sent to a device and not yet acknowledged: at most ``size`` at once.

    Each carries a token (what to do once acknowledged). Packet identifiers are reused only once free.
    """

    size: int
    _in_flight: dict[int, Token] = field(default_factory=dict)
    _next_id: int = 1

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self.size

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def take(self, token: Token) -> int:
        """A packet identifier for a message about to be sent; refuses when the window is full."""
        if self.full:
            raise ProtocolViolation("the outbound window is full", code="window_full")
        while self._next_id in self._in_flight:
            self._next_id = self._next_id % 0xFFFF + 1
        packet_id = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1
        self._in_flight[packet_id] = token
        return packet_id

    def acknowledge(self, packet_id: int) -> Token:
        """The token of an acknowledged message; an unknown identifier is a protocol violation."""
        try:
            return self._in_flight.pop(packet_id)
        except KeyError:
            raise ProtocolViolation(f"PUBACK for packet {packet_id}, which is not in flight") from None

    def unacknowledged(self) -> list[Token]:
        """What was sent and never acknowledged (to send again on the next session)."""
        return list(self._in_flight.values())


@dataclass
class TokenBucket:
    """``rate`` per second, bursts up to ``burst``: how long to wait before ``cost`` more is allowed."""

    rate: float
    burst: float
    _level: float = 0.0
    _at: float | None = None  # None until the first spend: the level may go negative (a debt)

    def spend(self, cost: float, now: float) -> float:
        """Spend ``cost``; return 0 if it was within the limit, else the seconds until it would have been."""
        if self._at is None:
            self._level, self._at = self.burst, now
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        self._level -= cost
        return 0.0 if self._level >= 0 else -self._level / self.rate


@dataclass
class Backlog(Generic[Token]):
    """A bounded FIFO: what waits for room in a window; ``push`` refuses when it is full."""

    limit: int
    _items: deque[Token] = field(default_factory=deque)

    def push(self, item: Token) -> bool:
        if len(self._items) >= self.limit:
            return False
        self._items.append(item)
        return True

    def pop(self) -> Token | None:
        return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)
