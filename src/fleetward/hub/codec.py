"""MQTT 3.1.1 packets: bytes in, typed packets out, and back. Pure: no sockets, no clocks.

:class:`PacketReader` takes bytes as they arrive and hands out whole packets, refusing with
:class:`ProtocolViolation` anything the specification forbids: a remaining length longer than four bytes
or than the configured maximum, an unknown packet type, reserved flags set, a packet whose content does
not fill its declared length exactly, strings that are not well-formed UTF-8 or hold U+0000, wildcards in
a topic name, packet identifier 0, QoS 3. ``encode`` turns any packet back into bytes, so that tests and the
load generator speak the same codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from fleetward.errors import ProtocolViolation

MAX_REMAINING_LENGTH = 268_435_455


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnectReturnCode(IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    client_id: str
    keep_alive: int
    clean_session: bool = True
    protocol_level: int = 4
    protocol_name: str = "MQTT"
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None


@dataclass(frozen=True)
class ConnAck:
    return_code: ConnectReturnCode = ConnectReturnCode.ACCEPTED
    session_present: bool = False


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True)
class PubRec:
    packet_id: int


@dataclass(frozen=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True)
class PubComp:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SubAck:
    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True)
class UnsubAck:
    packet_id: int


@dataclass(frozen=True)
class PingReq:
    pass


@dataclass(frozen=True)
class PingResp:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)


def _violation(message: str, code: str = "malformed_packet") -> ProtocolViolation:
    return ProtocolViolation(message, code=code)


# ---------------------------------------------------------------------- decoding


class _Cursor:
    """Reads the variable header and payload of one packet, never past its end."""

    __slots__ = ("_data", "_position")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def byte(self) -> int:
        if self._position >= len(self._data):
            raise _violation("the packet ends before its content does", "truncated_packet")
        value = self._data[self._position]
        self._position += 1
        return value

    def uint16(self) -> int:
        if self._position + 2 > len(self._data):
            raise _violation("the packet ends before its content does", "truncated_packet")
        value = int.from_bytes(self._data[self._position : self._position + 2], "big")
        self._position += 2
        return value

    def binary(self) -> bytes:
        length = self.uint16()
        if self._position + length > len(self._data):
            raise _violation("a field is longer than what is left of the packet", "truncated_packet")
        value = self._data[self._position : self._position + length]
        self._position += length
        return bytes(value)

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _violation("a string is not well-formed UTF-8", "bad_utf8") from None
        if "\x00" in value:
            raise _violation("a string holds U+0000", "bad_utf8")
        return value

    def rest(self) -> bytes:
        value = self._data[self._position :]
        self._position = len(self._data)
        return bytes(value)

    def packet_id(self) -> int:
        value = self.uint16()
        if value == 0:
            raise _violation("packet identifier 0 is not allowed")
        return value

    def finish(self) -> None:
        if self._position != len(self._data):
            raise _violation("the packet holds more than its content", "trailing_bytes")


def _check_flags(kind: PacketType, flags: int) -> None:
    expected = 0b0010 if kind in (PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE) else 0
    if flags != expected:
        raise _violation(f"reserved flags of {kind.name} are set wrong")


def _topic_name(value: str) -> str:
    if not value:
        raise _violation("a topic name is empty", "bad_topic")
    if "+" in value or "#" in value:
        raise _violation("a topic name holds a wildcard", "bad_topic")
    return value


def _decode_connect(cursor: _Cursor) -> Connect:
    protocol_name = cursor.text()
    protocol_level = cursor.byte()
    flags = cursor.byte()
    keep_alive = cursor.uint16()
    if protocol_name not in ("MQTT", "MQIsdp"):
        raise _violation(f"unknown protocol name {protocol_name[:16]!r}", "bad_protocol")
    if protocol_level == 5:
        # MQTT 5 CONNECT carries properties; the caller answers "unacceptable protocol version".
        return Connect(client_id="", keep_alive=keep_alive, protocol_level=5, protocol_name=protocol_name)
    if flags & 0x01:
        raise _violation("the reserved CONNECT flag is set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    password_flag = bool(flags & 0x40)
    username_flag = bool(flags & 0x80)
    if not will_flag and (will_qos or will_retain):
        raise _violation("will QoS or retain is set without a will")
    if will_qos == 3:
        raise _violation("will QoS 3 does not exist")
    if password_flag and not username_flag:
        raise _violation("a password without a user name")
    client_id = cursor.text()
    will = None
    if will_flag:
        will = Will(_topic_name(cursor.text()), cursor.binary(), will_qos, will_retain)
    username = cursor.text() if username_flag else None
    password = cursor.binary() if password_flag else None
    cursor.finish()
    return Connect(
        client_id=client_id,
        keep_alive=keep_alive,
        clean_session=bool(flags & 0x02),
        protocol_level=protocol_level,
        protocol_name=protocol_name,
        will=will,
        username=username,
        password=password,
    )


def _decode(kind: PacketType, flags: int, body: bytes) -> Packet:
    cursor = _Cursor(body)
    if kind is PacketType.PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise _violation("QoS 3 does not exist")
        topic = _topic_name(cursor.text())
        packet_id = cursor.packet_id() if qos else None
        if not qos and flags & 0x08:
            raise _violation("DUP is set on a QoS 0 message")
        return Publish(topic, cursor.rest(), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id)
    _check_flags(kind, flags)
    packet: Packet
    if kind is PacketType.CONNECT:
        return _decode_connect(cursor)
    if kind is PacketType.CONNACK:
        flags_byte = cursor.byte()
        code = cursor.byte()
        if flags_byte & 0xFE or code > 5:
            raise _violation("CONNACK holds reserved values")
        packet = ConnAck(ConnectReturnCode(code), bool(flags_byte & 1))
    elif kind is PacketType.PUBACK:
        packet = PubAck(cursor.packet_id())
    elif kind is PacketType.PUBREC:
        packet = PubRec(cursor.packet_id())
    elif kind is PacketType.PUBREL:
        packet = PubRel(cursor.packet_id())
    elif kind is PacketType.PUBCOMP:
        packet = PubComp(cursor.packet_id())
    elif kind is PacketType.SUBSCRIBE:
        identifier = cursor.packet_id()
        topics: list[tuple[str, int]] = []
        while cursor.remaining:
            topic_filter = cursor.text()
            requested = cursor.byte()
            if requested > 2:
                raise _violation("a requested QoS is not 0, 1 or 2")
            if not topic_filter:
                raise _violation("a topic filter is empty", "bad_topic")
            topics.append((topic_filter, requested))
        if not topics:
            raise _violation("a SUBSCRIBE names no topic")
        packet = Subscribe(identifier, tuple(topics))
    elif kind is PacketType.SUBACK:
        identifier = cursor.packet_id()
        codes = tuple(cursor.rest())
        if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
            raise _violation("SUBACK return codes are wrong")
        packet = SubAck(identifier, codes)
    elif kind is PacketType.UNSUBSCRIBE:
        identifier = cursor.packet_id()
        filters: list[str] = []
        while cursor.remaining:
            filters.append(cursor.text())
        if not filters:
            raise _violation("an UNSUBSCRIBE names no topic")
        packet = Unsubscribe(identifier, tuple(filters))
    elif kind is PacketType.UNSUBACK:
        packet = UnsubAck(cursor.packet_id())
    elif kind is PacketType.PINGREQ:
        packet = PingReq()
    elif kind is PacketType.PINGRESP:
        packet = PingResp()
    else:
        packet = Disconnect()
    cursor.finish()
    return packet


@dataclass
class PacketReader:
    """Reassembles packets from a byte stream; ``max_packet_bytes`` bounds each one, header included."""

    max_packet_bytes: int
    _buffer: bytearray = field(default_factory=bytearray)

    @property
    def buffered(self) -> int:
        """Bytes of a packet not yet complete (the shell times out a client that stops mid-packet)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        """Every packet ``data`` completes, in order; raises on the first violation."""
        self._buffer += data
        packets: list[Packet] = []
        while True:
            header = self._header()
            if header is None:
                return packets
            kind, flags, start, length = header
            end = start + length
            if len(self._buffer) < end:
                return packets
            body = bytes(self._buffer[start:end])
            del self._buffer[:end]
            packets.append(_decode(kind, flags, body))

    def _header(self) -> tuple[PacketType, int, int, int] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first = buffer[0]
        try:
            kind = PacketType(first >> 4)
        except ValueError:
            raise _violation(f"packet type {first >> 4} does not exist", "unknown_packet_type") from None
        length = 0
        multiplier = 1
        for index in range(1, 5):
            if index >= len(buffer):
                return None
            encoded = buffer[index]
            length += (encoded & 0x7F) * multiplier
            if length + index + 1 > self.max_packet_bytes:
                raise _violation(
                    f"the packet is larger than {self.max_packet_bytes} bytes", "packet_too_large"
                )
            if not encoded & 0x80:
                return kind, first & 0x0F, index + 1, length
            multiplier *= 128
        raise _violation("the remaining length is longer than four bytes", "bad_remaining_length")


# ---------------------------------------------------------------------- encoding


def _length(value: int) -> bytes:
    if value > MAX_REMAINING_LENGTH:
        raise ValueError("a packet cannot be that large")
    encoded = bytearray()
    while True:
        value, digit = divmod(value, 128)
        encoded.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("an MQTT string or binary field holds at most 65,535 bytes")
    return len(value).to_bytes(2, "big") + value


def _text(value: str) -> bytes:
    return _binary(value.encode("utf-8"))


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _length(len(body)) + body


def encode(packet: Packet) -> bytes:
    """The bytes of ``packet`` on the wire."""
    if isinstance(packet, Publish):
        first = (PacketType.PUBLISH << 4) | (packet.qos << 1) | (0x08 if packet.dup else 0) | packet.retain
        body = _text(packet.topic)
        if packet.qos:
            if not packet.packet_id:
                raise ValueError("a QoS 1 or 2 PUBLISH needs a packet identifier")
            body += packet.packet_id.to_bytes(2, "big")
        return _frame(first, body + packet.payload)
    if isinstance(packet, PubAck):
        return bytes((PacketType.PUBACK << 4, 2)) + packet.packet_id.to_bytes(2, "big")
    if isinstance(packet, ConnAck):
        return bytes((PacketType.CONNACK << 4, 2, int(packet.session_present), packet.return_code))
    if isinstance(packet, SubAck):
        return _frame(
            PacketType.SUBACK << 4, packet.packet_id.to_bytes(2, "big") + bytes(packet.return_codes)
        )
    if isinstance(packet, UnsubAck):
        return bytes((PacketType.UNSUBACK << 4, 2)) + packet.packet_id.to_bytes(2, "big")
    if isinstance(packet, PingResp):
        return bytes((PacketType.PINGRESP << 4, 0))
    if isinstance(packet, PingReq):
        return bytes((PacketType.PINGREQ << 4, 0))
    if isinstance(packet, Disconnect):
        return bytes((PacketType.DISCONNECT << 4, 0))
    if isinstance(packet, PubRec):
        return bytes((PacketType.PUBREC << 4, 2)) + packet.packet_id.to_bytes(2, "big")
    if isinstance(packet, PubRel):
        return bytes(((PacketType.PUBREL << 4) | 0b0010, 2)) + packet.packet_id.to_bytes(2, "big")
    if isinstance(packet, PubComp):
        return bytes((PacketType.PUBCOMP << 4, 2)) + packet.packet_id.to_bytes(2, "big")
    if isinstance(packet, Subscribe):
        body = packet.packet_id.to_bytes(2, "big") + b"".join(
            _text(topic) + bytes((qos,)) for topic, qos in packet.topics
        )
        return _frame((PacketType.SUBSCRIBE << 4) | 0b0010, body)
    if isinstance(packet, Unsubscribe):
        body = packet.packet_id.to_bytes(2, "big") + b"".join(_text(topic) for topic in packet.topics)
        return _frame((PacketType.UNSUBSCRIBE << 4) | 0b0010, body)
    return _encode_connect(packet)


def _encode_connect(packet: Connect) -> bytes:
    flags = 0x02 if packet.clean_session else 0
    payload = _text(packet.client_id)
    if packet.will is not None:
        flags |= 0x04 | (packet.will.qos << 3) | (0x20 if packet.will.retain else 0)
        payload += _text(packet.will.topic) + _binary(packet.will.payload)
    if packet.username is not None:
        flags |= 0x80
        payload += _text(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += _binary(packet.password)
    variable = (
        _text(packet.protocol_name)
        + bytes((packet.protocol_level, flags))
        + packet.keep_alive.to_bytes(2, "big")
    )
    return _frame(PacketType.CONNECT << 4, variable + payload)
