"""The MQTT codec of the hub: every packet survives encode → read, bytes may arrive in any pieces, and every
malformed input is refused with :class:`ProtocolViolation` and a code saying what was wrong — never with
an ``IndexError``, ``ValueError`` or ``UnicodeError`` escaping, never by buffering past the packet bound.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.errors import ProtocolViolation
from fleetward.hub.codec import (
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Disconnect,
    Packet,
    PacketReader,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
)

LARGE = 1024 * 1024


# ---------------------------------------------------------------------------------------------- strategies

#: What MQTT allows in a string: any Unicode scalar value but U+0000 (surrogates cannot be UTF-8 anyway).
mqtt_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
topic_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00+#"),
    min_size=1,
    max_size=40,
)
topic_filters = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40
)
packet_ids = st.integers(min_value=1, max_value=0xFFFF)
payloads = st.binary(max_size=300)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(min_value=0, max_value=2))
    return Publish(
        topic=draw(topic_names),
        payload=draw(payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else None,
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    protocol_name, protocol_level = draw(st.sampled_from([("MQTT", 4), ("MQIsdp", 3)]))
    username = draw(st.none() | mqtt_text)
    will = draw(
        st.none()
        | st.builds(Will, topic_names, payloads, st.integers(min_value=0, max_value=2), st.booleans())
    )
    return Connect(
        client_id=draw(mqtt_text),
        keep_alive=draw(st.integers(min_value=0, max_value=0xFFFF)),
        clean_session=draw(st.booleans()),
        protocol_level=protocol_level,
        protocol_name=protocol_name,
        will=will,
        username=username,
        password=draw(st.none() | payloads) if username is not None else None,
    )


packets: st.SearchStrategy[Packet] = st.one_of(
    connects(),
    st.builds(ConnAck, st.sampled_from(ConnectReturnCode), st.booleans()),
    publishes(),
    st.builds(PubAck, packet_ids),
    st.builds(PubRec, packet_ids),
    st.builds(PubRel, packet_ids),
    st.builds(PubComp, packet_ids),
    st.builds(
        Subscribe,
        packet_ids,
        st.lists(st.tuples(topic_filters, st.integers(min_value=0, max_value=2)), min_size=1, max_size=5).map(
            tuple
        ),
    ),
    st.builds(
        SubAck,
        packet_ids,
        st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=5).map(tuple)),
    st.builds(UnsubAck, packet_ids),
    st.just(PingReq()),
    st.just(PingResp()),
    st.just(Disconnect()),
)


# ---------------------------------------------------------------------------------------------- round trips


@given(packets)
def test_every_packet_reads_back_as_itself_after_encoding(packet: Packet) -> None:
    reader = PacketReader(LARGE)
    assert reader.feed(encode(packet)) == [packet]
    assert reader.buffered == 0


@given(st.lists(packets, min_size=1, max_size=6))
def test_a_stream_fed_byte_by_byte_yields_the_same_packets_as_fed_whole(stream: list[Packet]) -> None:
    data = b"".join(encode(packet) for packet in stream)
    reader = PacketReader(LARGE)
    read: list[Packet] = []
    for index in range(len(data)):
        read += reader.feed(data[index : index + 1])
    assert read == stream
    assert reader.buffered == 0


@given(st.lists(packets, min_size=1, max_size=6), st.data())
def test_a_stream_cut_anywhere_yields_the_same_packets(stream: list[Packet], data: st.DataObject) -> None:
    wire = b"".join(encode(packet) for packet in stream)
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(wire)), max_size=8)))
    reader = PacketReader(LARGE)
    read: list[Packet] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        read += reader.feed(wire[start:end])
    assert read == stream


def test_a_packet_exactly_at_the_bound_is_read_and_one_byte_more_is_refused() -> None:
    packet = Publish("t", b"x" * 100)
    size = len(encode(packet))
    assert PacketReader(size).feed(encode(packet)) == [packet]
    with pytest.raises(ProtocolViolation) as refused:
        PacketReader(size - 1).feed(encode(packet))
    assert refused.value.code == "packet_too_large"


def test_an_oversized_packet_is_refused_from_its_header_before_its_body_arrives() -> None:
    header = encode(Publish("t", b"x" * 10_000))[:4]
    with pytest.raises(ProtocolViolation) as refused:
        PacketReader(1000).feed(header)
    assert refused.value.code == "packet_too_large"


def test_an_mqtt5_connect_reads_as_protocol_level_5_for_the_session_to_refuse() -> None:
    """MQTT 5 adds properties after the keep-alive; the reader stops there and reports level 5."""
    body = text(b"MQTT") + bytes((5, 0x02)) + (60).to_bytes(2, "big") + b"\x00" + text(b"device")
    (packet,) = PacketReader(LARGE).feed(frame(0x10, body))
    assert isinstance(packet, Connect)
    assert packet.protocol_level == 5
    assert packet.keep_alive == 60


def test_encoding_a_qos1_publish_without_a_packet_id_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="packet identifier"):
        encode(Publish("t", b"", qos=1))


# ---------------------------------------------------------------------------------------------- bad input


def text(raw: bytes) -> bytes:
    """An MQTT string field holding ``raw`` as is (which may be bad UTF-8)."""
    return len(raw).to_bytes(2, "big") + raw


def frame(first: int, body: bytes) -> bytes:
    """A packet with a correct remaining length around ``body``."""
    length, encoded = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes((first,)) + bytes(encoded) + body


def connect_body(flags: int, payload: bytes = text(b"device"), name: bytes = b"MQTT") -> bytes:
    return text(name) + bytes((4, flags)) + (60).to_bytes(2, "big") + payload


MALFORMED: list[tuple[str, bytes, str]] = [
    # the fixed header
    ("remaining length of five bytes", b"\x30\xff\xff\xff\xff\x01", "bad_remaining_length"),
    ("packet type 0", b"\x00\x00", "unknown_packet_type"),
    ("packet type 15", b"\xf0\x00", "unknown_packet_type"),
    ("PINGREQ with a reserved flag set", b"\xc1\x00", "malformed_packet"),
    ("PUBACK with a reserved flag set", b"\x48\x02\x00\x01", "malformed_packet"),
    (
        "SUBSCRIBE without its required flag bits",
        frame(0x80, b"\x00\x01" + text(b"a") + b"\x00"),
        "malformed_packet",
    ),
    ("PUBREL without its required flag bits", b"\x60\x02\x00\x01", "malformed_packet"),
    ("CONNECT with flag bits", frame(0x11, connect_body(0x02)), "malformed_packet"),
    # content that does not fill its length exactly
    ("PUBACK one byte short", b"\x40\x01\x00", "truncated_packet"),
    ("PUBLISH whose topic runs past the packet", frame(0x30, b"\x00\x10ab"), "truncated_packet"),
    ("PUBLISH QoS 1 without its packet id", frame(0x32, text(b"t") + b"\x00"), "truncated_packet"),
    ("CONNECT cut inside its header", frame(0x10, text(b"MQTT") + b"\x04"), "truncated_packet"),
    ("CONNECT whose username is announced and missing", frame(0x10, connect_body(0x82)), "truncated_packet"),
    ("SUBSCRIBE topic without its QoS byte", frame(0x82, b"\x00\x01" + text(b"a")), "truncated_packet"),
    ("PUBACK with a byte too many", b"\x40\x03\x00\x01\x00", "trailing_bytes"),
    ("PINGREQ with content", b"\xc0\x01\x00", "trailing_bytes"),
    ("DISCONNECT with content", b"\xe0\x01\x00", "trailing_bytes"),
    (
        "CONNECT with bytes after its payload",
        frame(0x10, connect_body(0x02, text(b"d") + b"x")),
        "trailing_bytes",
    ),
    # strings
    ("topic of invalid UTF-8", frame(0x30, text(b"\xff\xfe")), "bad_utf8"),
    ("topic with a UTF-16 surrogate", frame(0x30, text(b"a\xed\xa0\x80")), "bad_utf8"),
    ("topic with an overlong encoding", frame(0x30, text(b"\xc0\xaf")), "bad_utf8"),
    ("topic holding U+0000", frame(0x30, text(b"a\x00b")), "bad_utf8"),
    ("client id of invalid UTF-8", frame(0x10, connect_body(0x02, text(b"\x80"))), "bad_utf8"),
    ("subscription filter holding U+0000", frame(0x82, b"\x00\x01" + text(b"\x00") + b"\x00"), "bad_utf8"),
    # topics
    ("PUBLISH topic with +", frame(0x30, text(b"devices/+/messages")), "bad_topic"),
    ("PUBLISH topic with #", frame(0x30, text(b"devices/#")), "bad_topic"),
    ("PUBLISH with an empty topic", frame(0x30, text(b"")), "bad_topic"),
    (
        "will topic with a wildcard",
        frame(0x10, connect_body(0x06, text(b"d") + text(b"#") + text(b""))),
        "bad_topic",
    ),
    ("SUBSCRIBE with an empty filter", frame(0x82, b"\x00\x01" + text(b"") + b"\x00"), "bad_topic"),
    # packet identifiers and QoS
    ("PUBACK for packet id 0", b"\x40\x02\x00\x00", "malformed_packet"),
    ("PUBLISH QoS 1 with packet id 0", frame(0x32, text(b"t") + b"\x00\x00"), "malformed_packet"),
    ("SUBSCRIBE with packet id 0", frame(0x82, b"\x00\x00" + text(b"a") + b"\x00"), "malformed_packet"),
    ("PUBLISH with QoS 3", frame(0x36, text(b"t") + b"\x00\x01"), "malformed_packet"),
    ("PUBLISH QoS 0 with DUP", frame(0x38, text(b"t")), "malformed_packet"),
    ("SUBSCRIBE naming no topic", frame(0x82, b"\x00\x01"), "malformed_packet"),
    ("SUBSCRIBE requesting QoS 3", frame(0x82, b"\x00\x01" + text(b"a") + b"\x03"), "malformed_packet"),
    ("UNSUBSCRIBE naming no topic", frame(0xA2, b"\x00\x01"), "malformed_packet"),
    ("SUBACK with return code 3", frame(0x90, b"\x00\x01\x03"), "malformed_packet"),
    ("CONNACK with return code 6", b"\x20\x02\x00\x06", "malformed_packet"),
    # CONNECT flags
    ("CONNECT with its reserved flag", frame(0x10, connect_body(0x03)), "malformed_packet"),
    ("will QoS without a will", frame(0x10, connect_body(0x08)), "malformed_packet"),
    ("will retain without a will", frame(0x10, connect_body(0x20)), "malformed_packet"),
    ("will QoS 3", frame(0x10, connect_body(0x1C, text(b"d") + text(b"w") + text(b""))), "malformed_packet"),
    (
        "password without a username",
        frame(0x10, connect_body(0x42, text(b"d") + text(b"pw"))),
        "malformed_packet",
    ),
    ("unknown protocol name", frame(0x10, connect_body(0x02, name=b"HTTP")), "bad_protocol"),
    ("protocol name of invalid UTF-8", frame(0x10, connect_body(0x02, name=b"\xffQTT")), "bad_utf8"),
]


@pytest.mark.parametrize(
    ("data", "code"), [pytest.param(data, code, id=name) for name, data, code in MALFORMED]
)
def test_malformed_input_is_refused_with_its_code(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolViolation) as refused:
        PacketReader(1 << 30).feed(data)
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("data", "code"), [pytest.param(data, code, id=name) for name, data, code in MALFORMED]
)
def test_malformed_input_is_refused_the_same_when_it_arrives_byte_by_byte(data: bytes, code: str) -> None:
    """Refused as soon as the bytes so far are wrong, and never by handing out a packet first."""
    with pytest.raises(ProtocolViolation) as refused:
        feed_byte_by_byte(PacketReader(1 << 30), data)
    assert refused.value.code == code


def feed_byte_by_byte(reader: PacketReader, data: bytes) -> None:
    for index in range(len(data)):
        assert reader.feed(data[index : index + 1]) == []


def test_packets_before_a_malformed_one_are_not_lost_when_fed_apart() -> None:
    reader = PacketReader(LARGE)
    assert reader.feed(encode(PingReq())) == [PingReq()]
    with pytest.raises(ProtocolViolation):
        reader.feed(b"\xf0\x00")


# ---------------------------------------------------------------------------------------------- fuzz


def feed_all(reader: PacketReader, chunks: list[bytes]) -> list[Packet]:
    """Feed ``chunks`` until the reader refuses; after every feed it holds at most one packet's bound."""
    read: list[Packet] = []
    refusal: ProtocolViolation | None = None
    for chunk in chunks:
        try:
            read += reader.feed(chunk)
        except ProtocolViolation as refused:
            refusal = refused
            break
        assert reader.buffered <= reader.max_packet_bytes
    assert refusal is None or refusal.code  # a refusal always says why
    return read


def check_reencodes(read: list[Packet]) -> None:
    """Whatever the reader accepts, ``encode`` writes back in a form the reader reads as the same packet."""
    for packet in read:
        assert PacketReader(LARGE).feed(encode(packet)) == [packet]


@settings(max_examples=400)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8), st.integers(min_value=2, max_value=512))
def test_arbitrary_bytes_yield_packets_or_a_protocol_violation_and_nothing_else(
    chunks: list[bytes], max_packet_bytes: int
) -> None:
    check_reencodes(feed_all(PacketReader(max_packet_bytes), chunks))


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """Valid packets with bytes overwritten, inserted or cut: fuzz that reaches past the fixed header."""
    wire = bytearray(b"".join(encode(packet) for packet in draw(st.lists(packets, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        position = draw(st.integers(min_value=0, max_value=max(len(wire) - 1, 0)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
        value = draw(st.integers(min_value=0, max_value=255))
        if action == "overwrite" and wire:
            wire[position] = value
        elif action == "insert":
            wire.insert(position, value)
        elif action == "delete" and wire:
            del wire[position]
        else:
            del wire[position:]
    return bytes(wire)


@settings(max_examples=400)
@given(mutated_streams(), st.integers(min_value=1, max_value=16))
def test_mutated_packets_yield_packets_or_a_protocol_violation_and_nothing_else(
    wire: bytes, piece: int
) -> None:
    reader = PacketReader(4096)
    chunks = [wire[index : index + piece] for index in range(0, len(wire), piece)]
    check_reencodes(feed_all(reader, chunks))
