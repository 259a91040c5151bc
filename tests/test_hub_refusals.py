"""Each bad input at the hub gets a clear refusal, a recorded event, and leaves the hub up for everyone else.

Every case goes through the real hub over real TLS: a raw MQTT client written here (so that it can send what
no library would) or aiomqtt. Each test checks the refusal the device sees (a TLS alert, a CONNACK code, a
SUBACK 0x80, a 413, or the connection closed), the security event the hub recorded — in the device's tenant
once the certificate named one, with no tenant before — and that a good device, connected before the bad
input arrived, still publishes telemetry afterwards on its session and on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetward.api import schemas
from fleetward.authority import ca
from fleetward.config import Limits
from fleetward.hub.codec import (
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Packet,
    PacketReader,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    encode,
)
from fleetward.sim.fleet import SimulatedDevice
from fleetward.store import events as event_log
from tests.conftest import HubSetup, healthy_software, make_tenant

TIMEOUT = 10.0
PACKET_TIMEOUT = 1
CONNECT_TIMEOUT = 2
MAX_PACKET = 64 * 1024


@pytest.fixture
def limits() -> Limits:
    """Short timeouts, so that slow clients are closed within the test's patience; room for a 33 KiB patch."""
    return Limits(
        hub_packet_timeout_seconds=PACKET_TIMEOUT,
        hub_connect_timeout_seconds=CONNECT_TIMEOUT,
        mqtt_max_packet_bytes=MAX_PACKET,
    )


@pytest.fixture
def device(hub: HubSetup) -> SimulatedDevice:
    """The device that misbehaves (or whose certificate does)."""
    return hub.enroll(SimulatedDevice("bad-1", healthy_software()))


@pytest.fixture
def good(hub: HubSetup) -> SimulatedDevice:
    """A bystander that behaves: the hub must keep serving it."""
    return hub.enroll(SimulatedDevice("good-1", healthy_software()))


# ---------------------------------------------------------------------------------------------- a raw client


class RawClient:
    """MQTT bytes over TLS, with nothing checked on the client side: it sends whatever it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._packets = PacketReader(1 << 20)
        self._received: list[Packet] = []

    def send(self, *items: Packet | bytes) -> None:
        for item in items:
            self.writer.write(item if isinstance(item, bytes) else encode(item))

    async def receive(self, timeout: float = TIMEOUT) -> Packet:
        """The next packet from the hub; fails if the connection ends or nothing comes in time."""
        async with asyncio.timeout(timeout):
            while not self._received:
                data = await self.reader.read(65536)
                assert data, "the hub closed the connection"
                self._received += self._packets.feed(data)
        return self._received.pop(0)

    async def closed(self, timeout: float = TIMEOUT) -> list[Packet]:
        """What the hub sent before it closed the connection; fails if it is still open after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    break
                if not data:
                    break
                self._received += self._packets.feed(data)
        received, self._received = self._received, []
        return received

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw(hub: HubSetup, context: ssl.SSLContext | None) -> AsyncIterator[RawClient]:
    """A TCP connection to the hub, with TLS when ``context`` is given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.hub_port, ssl=context)
    client = RawClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


def connect_packet(device_id: str, *, client_id: str | None = None, username: str | None = None) -> Connect:
    return Connect(
        client_id=device_id if client_id is None else client_id,
        keep_alive=60,
        username=username or f"127.0.0.1/{device_id}/?api-version=2021-04-12",
    )


@contextlib.asynccontextmanager
async def session(hub: HubSetup, device: SimulatedDevice) -> AsyncIterator[RawClient]:
    """A raw client that has connected as ``device`` and been accepted."""
    async with raw(hub, hub.device_tls(device)) as client:
        client.send(connect_packet(device.device_id))
        assert await client.receive() == ConnAck(ConnectReturnCode.ACCEPTED)
        yield client


def frame(first: int, body: bytes) -> bytes:
    """A packet whose remaining length is right, around a body that may be wrong."""
    length, encoded = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes((first,)) + bytes(encoded) + body


def text(raw_bytes: bytes) -> bytes:
    return len(raw_bytes).to_bytes(2, "big") + raw_bytes


def telemetry_topic(device: SimulatedDevice) -> str:
    return f"devices/{device.device_id}/messages/events/"


async def tls_refusal(hub: HubSetup, context: ssl.SSLContext, device_id: str) -> ssl.SSLError:
    """The TLS alert the hub answers a device presenting ``context``'s certificate with (TLS 1.3: the
    client's handshake completes first, and the alert arrives on its first read)."""
    try:
        async with raw(hub, context) as client:
            client.send(connect_packet(device_id))
            await client.receive()
    except ssl.SSLError as alert:
        return alert
    raise AssertionError("the hub accepted the certificate")


# ---------------------------------------------------------------------------------------------- certificates


def tenant_issuer(hub: HubSetup, tenant_id: str) -> ca.Issuer:
    """The tenant's issuing CA with its key, as the authority holds it: the test forges what no device can."""
    return hub.services.authority._signing_issuer(tenant_id).issuer


def client_context(
    hub: HubSetup, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> ssl.SSLContext:
    """A device's TLS context presenting ``certificate``; it trusts the hub's service CA."""
    name = f"forged-{certificate.serial_number:x}"[:32]
    certificate_file = Path(hub.directory) / f"{name}.pem"
    key_file = Path(hub.directory) / f"{name}.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(cafile=str(hub.tls.ca_file))
    context.load_cert_chain(str(certificate_file), str(key_file))
    return context


def issued(hub: HubSetup, issuer: ca.Issuer, device_id: str, now: dt.datetime) -> ssl.SSLContext:
    """A context with an operational certificate from ``issuer`` as if issued at ``now`` (24 hours valid)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = ca.issue_operational_certificate(
        issuer,
        key.public_key(),
        device_id,
        x509.random_serial_number(),
        now,
        dt.timedelta(hours=24),
        dt.timedelta(minutes=5),
    )
    return client_context(hub, certificate, key)


def self_signed(hub: HubSetup, tenant_id: str, device_id: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(ca.device_uri(tenant_id, device_id))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return client_context(hub, certificate, key)


# ---------------------------------------------------------------------------------------------- events


def wait_for_event(hub: HubSetup, code: str, *, device_id: str) -> list[str]:
    """The details of the hub events ``code`` of ``device_id`` in the tenant, once one is flushed."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        recorded = hub.hub_events(device_id=device_id)
        details = [event.detail for event in recorded if event.code == code]
        if details:
            return details
        assert time.monotonic() < deadline, (
            f"no hub event {code!r}; got {[(e.code, e.detail) for e in recorded]}"
        )
        time.sleep(0.1)


def wait_for_tenantless_event(hub: HubSetup, code: str) -> str:
    """The detail of the hub event ``code`` of no tenant (refused before a certificate named one)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with hub.services.database.read() as connection:
            recorded = event_log.query(connection, tenant_id=None, kind="hub", limit=1000)
        for event in recorded:
            if event.code == code:
                assert event.device_id is None
                return event.detail
        assert time.monotonic() < deadline, (
            f"no tenantless hub event {code!r}; got {[(e.code, e.detail) for e in recorded]}"
        )
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- the bystander


@contextlib.asynccontextmanager
async def beside(hub: HubSetup, good: SimulatedDevice) -> AsyncIterator[None]:
    """Hold the good device's session while the body misbehaves; then that session still publishes
    telemetry (acknowledged, so stored), and once it has closed, a new one is accepted and does too."""
    async with hub.mqtt(good) as held:
        yield
        await held.publish(f"{telemetry_topic(good)}phase=during", b'{"ok": 1}', qos=1)
    await good_publishes(hub, good)


async def good_publishes(hub: HubSetup, good: SimulatedDevice) -> None:
    async with hub.mqtt(good) as client:
        await client.publish(f"{telemetry_topic(good)}phase=after", b'{"ok": 2}', qos=1)


# ============================================================================================== certificates


def test_a_client_without_a_certificate_is_refused_in_the_handshake(
    hub: HubSetup, good: SimulatedDevice
) -> None:
    async def run() -> None:
        async with beside(hub, good):
            context = ssl.create_default_context(cafile=str(hub.tls.ca_file))
            alert = await tls_refusal(hub, context, good.device_id)
            assert alert.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"

    asyncio.run(run())
    assert "certificate" in wait_for_tenantless_event(hub, "certificate_missing")


@pytest.mark.parametrize(
    ("issued_at", "alert", "reason"),
    [
        pytest.param(dt.timedelta(days=-2), "SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired", id="expired"),
        pytest.param(
            dt.timedelta(days=2), "SSLV3_ALERT_BAD_CERTIFICATE", "not yet valid", id="not-yet-valid"
        ),
    ],
)
def test_a_certificate_outside_its_validity_is_refused_by_tls(
    hub: HubSetup,
    device: SimulatedDevice,
    good: SimulatedDevice,
    issued_at: dt.timedelta,
    alert: str,
    reason: str,
) -> None:
    """Issued by the tenant's own issuing CA for a claimed device: only the time is wrong."""
    context = issued(
        hub, tenant_issuer(hub, hub.tenant.id), device.device_id, dt.datetime.now(dt.UTC) + issued_at
    )

    async def run() -> None:
        async with beside(hub, good):
            assert (await tls_refusal(hub, context, device.device_id)).reason == alert

    asyncio.run(run())
    assert reason in wait_for_tenantless_event(hub, "certificate_refused")


def test_a_revoked_certificate_is_answered_not_authorized(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """TLS does not know revocations; the hub reads them from the store at every connection."""
    assert device.credential is not None
    hub.tenant.client.post(
        f"/v1/tenants/{hub.tenant.id}/certificates/{device.credential.issued.serial}/revoke",
        schemas.Revoke(),
        schemas.CertificatePublic,
    )

    async def run() -> None:
        async with beside(hub, good), raw(hub, hub.device_tls(device)) as client:
            client.send(connect_packet(device.device_id))
            assert await client.closed() == [ConnAck(ConnectReturnCode.NOT_AUTHORIZED)]

    asyncio.run(run())
    wait_for_event(hub, "certificate_revoked", device_id=device.device_id)


def test_a_self_signed_certificate_naming_a_claimed_device_is_refused_by_tls(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    context = self_signed(hub, hub.tenant.id, device.device_id)

    async def run() -> None:
        async with beside(hub, good):
            assert (await tls_refusal(hub, context, device.device_id)).reason == "TLSV1_ALERT_UNKNOWN_CA"

    asyncio.run(run())
    detail = wait_for_tenantless_event(hub, "certificate_refused")
    assert "self-signed" in detail or "self signed" in detail


def test_another_tenant_s_ca_cannot_connect_a_device_of_this_tenant(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """The forged certificate chains to a root the hub trusts (the other tenant's), and names this tenant's
    device in this tenant: only the binding of the named tenant to its own issuing CA refuses it."""
    other = make_tenant(hub.tenant.client, "rival-farm")
    forger = dataclasses.replace(tenant_issuer(hub, other.id), tenant_id=hub.tenant.id)
    context = issued(hub, forger, device.device_id, dt.datetime.now(dt.UTC))

    async def attempt() -> list[Packet]:
        async with raw(hub, context) as client:
            client.send(connect_packet(device.device_id))
            return await client.closed()

    async def run() -> None:
        async with beside(hub, good):
            deadline = time.monotonic() + TIMEOUT
            while True:  # until the hub trusts the new tenant's root (it is told at once; TLS may race it)
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    assert await attempt() == []  # no CONNACK: refused right after the handshake
                    return
                assert time.monotonic() < deadline, "the hub never trusted the other tenant's root"
                await asyncio.sleep(0.1)

    asyncio.run(run())
    assert "issuing CA" in wait_for_tenantless_event(hub, "certificate_wrong_tenant")


# ============================================================================================== CONNECT


@pytest.mark.parametrize(
    ("name", "return_code", "code"),
    [
        pytest.param(
            "client id", ConnectReturnCode.IDENTIFIER_REJECTED, "client_id_mismatch", id="client-id"
        ),
        pytest.param(
            "username", ConnectReturnCode.BAD_USERNAME_OR_PASSWORD, "username_mismatch", id="username"
        ),
    ],
)
def test_a_connect_naming_another_device_than_the_certificate_is_refused(
    hub: HubSetup,
    device: SimulatedDevice,
    good: SimulatedDevice,
    name: str,
    return_code: ConnectReturnCode,
    code: str,
) -> None:
    """The bad device's certificate, with the good device's id in its client id or in its user name."""
    if name == "client id":
        packet = connect_packet(device.device_id, client_id=good.device_id)
    else:
        packet = connect_packet(
            device.device_id, username=f"127.0.0.1/{good.device_id}/?api-version=2021-04-12"
        )

    async def run() -> None:
        async with beside(hub, good), raw(hub, hub.device_tls(device)) as client:
            client.send(packet)
            assert await client.closed() == [ConnAck(return_code)]

    asyncio.run(run())
    wait_for_event(hub, code, device_id=device.device_id)


def test_the_newer_connection_of_a_device_takes_over_and_the_older_is_closed(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> None:
        async with beside(hub, good), session(hub, device) as older, session(hub, device) as newer:
            assert await older.closed() == []
            newer.send(Publish(telemetry_topic(device), b"{}", qos=1, packet_id=7))
            assert await newer.receive() == PubAck(7)

    asyncio.run(run())
    wait_for_event(hub, "session_taken_over", device_id=device.device_id)


# ============================================================================================== topics


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("devices/{other}/messages/events/", id="another-device-s-telemetry"),
        pytest.param("sensors/temperature", id="a-random-topic"),
    ],
)
def test_a_publish_outside_the_device_s_topics_closes_its_connection(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice, topic: str
) -> None:
    """As IoT Hub does: no PUBACK, the connection ends."""
    topic = topic.format(other=good.device_id, own=device.device_id)

    async def run() -> None:
        async with beside(hub, good), session(hub, device) as client:
            client.send(Publish(topic, b"{}", qos=1, packet_id=1))
            assert await client.closed() == []

    asyncio.run(run())
    wait_for_event(hub, "topic_refused", device_id=device.device_id)


def test_a_subscription_outside_the_device_s_topics_is_answered_0x80_and_the_rest_granted(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> None:
        async with beside(hub, good), session(hub, device) as client:
            client.send(
                Subscribe(
                    3,
                    (
                        (f"devices/{good.device_id}/messages/devicebound/#", 1),
                        ("$iothub/twin/res/#", 1),
                        ("#", 0),
                    ),
                )
            )
            assert await client.receive() == SubAck(3, (SUBACK_FAILURE, 1, SUBACK_FAILURE))
            client.send(PingReq())  # the connection stays open
            assert await client.receive() == PingResp()

    asyncio.run(run())
    details = wait_for_event(hub, "topic_refused", device_id=device.device_id)  # both in one flush
    assert any(f"subscribe to 'devices/{good.device_id[:16]}" in detail for detail in details), details
    assert any("subscribe to '#'" in detail for detail in details), details


def test_a_qos_2_publish_closes_the_connection(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """IoT Hub does not speak QoS 2; neither does the hub."""

    async def run() -> None:
        async with beside(hub, good), session(hub, device) as client:
            client.send(Publish(telemetry_topic(device), b"{}", qos=2, packet_id=1))
            assert await client.closed() == []

    asyncio.run(run())
    wait_for_event(hub, "qos_unsupported", device_id=device.device_id)


# ====================================================================================== malformed packets


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(b"\x30\x80\x80\x80\x80\x01", "bad_remaining_length", id="remaining-length-of-5-bytes"),
        pytest.param(b"\xf0\x00", "unknown_packet_type", id="packet-type-15"),
        pytest.param(frame(0x30, text(b"devices/\xff\xfe/x")), "bad_utf8", id="bad-utf8-in-a-topic"),
        pytest.param(frame(0x40, b"\x00"), "truncated_packet", id="puback-too-short"),
        pytest.param(
            frame(0x30, text(b"t") + b"x" * MAX_PACKET), "packet_too_large", id="over-the-maximum-packet-size"
        ),
        pytest.param(encode(connect_packet("a" * 64)), "protocol_violation", id="a-second-connect"),
    ],
)
def test_a_malformed_packet_closes_the_connection_with_its_code(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice, data: bytes, code: str
) -> None:
    """One of each kind the issue names, through the shell; every malformation the codec refuses, and its
    code, is tabled in test_hub_codec.py. The oversized packet is refused from its header alone."""

    async def run() -> None:
        async with beside(hub, good), session(hub, device) as client:
            client.send(data)
            with contextlib.suppress(ConnectionError):
                await client.writer.drain()
            assert await client.closed() == []

    asyncio.run(run())
    wait_for_event(hub, code, device_id=device.device_id)


def test_a_first_packet_that_is_not_connect_closes_the_connection(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> None:
        async with beside(hub, good), raw(hub, hub.device_tls(device)) as client:
            client.send(Publish(telemetry_topic(device), b"{}"))
            assert await client.closed() == []

    asyncio.run(run())
    wait_for_event(hub, "protocol_violation", device_id=device.device_id)


# ============================================================================================== slow clients


def test_a_packet_left_unfinished_is_timed_out(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> float:
        async with beside(hub, good), session(hub, device) as client:
            client.send(encode(Publish(telemetry_topic(device), b"0123456789", qos=1, packet_id=1))[:12])
            started = time.monotonic()
            assert await client.closed() == []
            return time.monotonic() - started

    assert asyncio.run(run()) >= PACKET_TIMEOUT * 0.9
    wait_for_event(hub, "packet_timeout", device_id=device.device_id)


def test_a_client_that_never_finishes_its_tls_handshake_is_timed_out(
    hub: HubSetup, good: SimulatedDevice
) -> None:
    async def run() -> float:
        async with beside(hub, good), raw(hub, None) as client:  # TCP only: not even a ClientHello
            started = time.monotonic()
            assert await client.closed() == []
            return time.monotonic() - started

    assert asyncio.run(run()) >= CONNECT_TIMEOUT * 0.9
    wait_for_tenantless_event(hub, "handshake_timeout")


def test_a_client_that_never_sends_connect_is_timed_out(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> float:
        async with beside(hub, good), raw(hub, hub.device_tls(device)) as client:
            started = time.monotonic()
            assert await client.closed() == []
            return time.monotonic() - started

    assert asyncio.run(run()) >= CONNECT_TIMEOUT * 0.5  # the clock started after the handshake
    wait_for_event(hub, "connect_timeout", device_id=device.device_id)


# ====================================================================================== floods and bounds

RATE = 20
BURST = 5


def flood(hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice, bodies: list[bytes]) -> float:
    """Publish ``bodies`` at QoS 1 all at once; the seconds until every one was acknowledged."""

    async def run() -> float:
        async with beside(hub, good), session(hub, device) as client:
            started = time.monotonic()
            client.send(
                *(
                    Publish(telemetry_topic(device), body, qos=1, packet_id=n + 1)
                    for n, body in enumerate(bodies)
                )
            )
            acknowledged = {await client.receive() for _ in bodies}
            assert acknowledged == {PubAck(n + 1) for n in range(len(bodies))}
            return time.monotonic() - started

    return asyncio.run(run())


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(
            Limits(
                hub_messages_per_second=RATE,
                hub_message_burst=BURST,
                hub_connect_timeout_seconds=CONNECT_TIMEOUT,
            ),
            id=f"{RATE}-per-second-burst-{BURST}",
        )
    ],
)
def test_a_flood_over_the_rate_limit_is_slowed_to_the_rate_and_recorded(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """Back-pressure, not loss: every message is stored and acknowledged, no faster than the rate allows."""
    count = 45
    elapsed = flood(hub, device, good, [b"%d" % n for n in range(count)])
    assert elapsed >= (count - BURST) / RATE * 0.95
    wait_for_event(hub, "rate_limited", device_id=device.device_id)
    stored = hub.tenant.client.get_list(
        f"/v1/tenants/{hub.tenant.id}/telemetry",
        schemas.TelemetryPublic,
        {"device_id": device.device_id, "limit": 1000},
    )
    assert len(stored) == count


BYTES_PER_SECOND = 8 * 1024


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(
            Limits(
                hub_bytes_per_second=BYTES_PER_SECOND,
                hub_connect_timeout_seconds=CONNECT_TIMEOUT,
            ),
            id=f"{BYTES_PER_SECOND}-bytes-per-second",
        )
    ],
)
def test_a_flood_over_the_byte_rate_is_slowed_to_the_rate_and_recorded(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """Few but large messages: the byte budget, not the message budget, slows them, and none is lost."""
    count, size = 6, 4 * 1024
    elapsed = flood(hub, device, good, [b"x" * size] * count)
    # A burst of two seconds' budget goes at once, and so does the message that runs the bucket into
    # debt; everything after it waits until the debt is repaid.
    assert elapsed >= (count * size - 2 * BYTES_PER_SECOND - size) / BYTES_PER_SECOND * 0.9
    wait_for_event(hub, "rate_limited", device_id=device.device_id)


@pytest.mark.parametrize(
    "limits",
    [pytest.param(Limits(hub_max_connections=1, hub_connect_timeout_seconds=CONNECT_TIMEOUT), id="one")],
)
def test_a_connection_past_the_hub_s_maximum_is_dropped_and_recorded(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    async def run() -> None:
        async with hub.mqtt(good) as held:
            async with raw(hub, None) as client:  # dropped before TLS: not even a ServerHello
                assert await client.closed() == []
            await held.publish(f"{telemetry_topic(good)}phase=during", b'{"ok": 1}', qos=1)
        async with session(hub, device) as client:  # room again once the first has gone
            client.send(Publish(telemetry_topic(device), b"{}", qos=1, packet_id=1))
            assert await client.receive() == PubAck(1)

    asyncio.run(run())
    assert "maximum" in wait_for_tenantless_event(hub, "hub_full")


def twin_exchange(hub: HubSetup, device: SimulatedDevice, body: bytes) -> tuple[str, bytes]:
    """Report ``body`` as a reported-properties patch; the topic and payload of the hub's answer."""

    async def run() -> tuple[str, bytes]:
        async with hub.mqtt(device) as client:
            await client.subscribe("$iothub/twin/res/#", qos=0)
            await client.publish("$iothub/twin/PATCH/properties/reported/?$rid=41", body, qos=0)
            async with asyncio.timeout(TIMEOUT):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    answer = message.topic.value, message.payload
                    break
            # the session is still good: the twin answers a GET
            await client.publish("$iothub/twin/GET/?$rid=42", b"", qos=0)
            async with asyncio.timeout(TIMEOUT):
                async for message in client.messages:
                    assert message.topic.value.startswith("$iothub/twin/res/200/?$rid=42")
                    break
            return answer

    return asyncio.run(run())


def test_a_reported_patch_over_32_kib_is_answered_413_and_recorded(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    body = json.dumps({"log": "x" * (32 * 1024)}).encode()
    topic, payload = twin_exchange(hub, device, body)
    assert topic == "$iothub/twin/res/413/?$rid=41"
    assert "32768" in json.loads(payload)["message"]
    wait_for_event(hub, "twin_too_large", device_id=device.device_id)
    asyncio.run(good_publishes(hub, good))


def test_a_reported_patch_nested_thousands_deep_is_answered_400_and_recorded(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    """Deep enough to exhaust the JSON parser's recursion: refused as too deep, never an unhandled error."""
    body = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    topic, _payload = twin_exchange(hub, device, body)
    assert topic == "$iothub/twin/res/400/?$rid=41"
    wait_for_event(hub, "twin_too_deep", device_id=device.device_id)
    asyncio.run(good_publishes(hub, good))


def test_a_quarantined_device_keeps_its_twin_but_its_telemetry_closes_the_connection(
    hub: HubSetup, device: SimulatedDevice, good: SimulatedDevice
) -> None:
    hub.tenant.client.post(
        f"/v1/tenants/{hub.tenant.id}/devices/{device.device_id}/quarantine",
        schemas.Quarantine(reason="remediation"),
        schemas.DevicePublic,
    )

    async def run() -> None:
        async with beside(hub, good), session(hub, device) as client:
            client.send(Subscribe(1, (("$iothub/twin/res/#", 0), ("$iothub/methods/POST/#", 0))))
            assert await client.receive() == SubAck(1, (0, SUBACK_FAILURE))
            client.send(Publish("$iothub/twin/GET/?$rid=1", b""))
            answer = await client.receive()
            assert isinstance(answer, Publish)
            assert answer.topic.startswith("$iothub/twin/res/200/")
            client.send(Publish(telemetry_topic(device), b"{}", qos=1, packet_id=2))
            assert await client.closed() == []

    asyncio.run(run())
    wait_for_event(hub, "quarantined", device_id=device.device_id)
