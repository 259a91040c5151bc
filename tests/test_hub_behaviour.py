"""What the hub does for devices that behave: telemetry, twins, direct methods, cloud-to-device messages,
sessions and quarantine, through real TLS, with paho (through aiomqtt) or a bare client on fleetward's own
codec as the device, and the operator API as the other side.

The bare client (:class:`RawDevice`) is for what paho does not let a test do: leave a message
unacknowledged, stay silent past its keep-alive, read the session-present flag of CONNACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import aiomqtt
import httpx
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import RootModel

from fleetward.api import schemas
from fleetward.client import FleetwardClient
from fleetward.clock import FakeClock
from fleetward.hub import codec
from fleetward.sim.fleet import SimulatedDevice
from fleetward.transport import trust
from tests.conftest import HubSetup, healthy_software, make_tenant

T = TypeVar("T")
PacketT = TypeVar("PacketT", bound=codec.Packet)
JsonPatch = RootModel[dict[str, Any]]

TWIN_RESPONSES = "$iothub/twin/res/#"
TWIN_DESIRED = "$iothub/twin/PATCH/properties/desired/#"
METHODS = "$iothub/methods/POST/#"


@pytest.fixture
def device(hub: HubSetup) -> SimulatedDevice:
    return hub.enroll(SimulatedDevice("room-1", healthy_software()))


# ---------------------------------------------------------------------- helpers: waiting


def eventually(check: Callable[[], T], *, timeout: float = 5.0, what: str = "the condition") -> T:
    """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s (last: {result!r})")
        time.sleep(0.05)


async def eventually_async(check: Callable[[], Awaitable[T]], *, timeout: float = 5.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'the condition'} did not hold within {timeout} s ({result!r})")
        await asyncio.sleep(0.05)


def hub_event(
    hub: HubSetup, device: SimulatedDevice, code: str, *, count: int = 1
) -> list[schemas.EventPublic]:
    """The hub's security events ``code`` of ``device``, once there are ``count`` (flushed every 0.5 s)."""

    def found() -> list[schemas.EventPublic]:
        events = [event for event in hub.hub_events(device_id=device.device_id) if event.code == code]
        return events if len(events) >= count else []

    return eventually(found, what=f"{count} hub event(s) {code}")


# ---------------------------------------------------------------------- helpers: the operator API


def device_path(hub: HubSetup, device: SimulatedDevice, rest: str = "") -> str:
    return f"/v1/tenants/{hub.tenant.id}/devices/{device.device_id}{rest}"


def telemetry(hub: HubSetup, **params: str | int) -> list[schemas.TelemetryPublic]:
    return hub.tenant.client.get_list(
        f"/v1/tenants/{hub.tenant.id}/telemetry", schemas.TelemetryPublic, params
    )


def twin(hub: HubSetup, device: SimulatedDevice) -> schemas.TwinPublic:
    return hub.tenant.client.get(device_path(hub, device, "/twin"), schemas.TwinPublic)


def patch_desired(hub: HubSetup, device: SimulatedDevice, patch: dict[str, Any]) -> schemas.DesiredPatched:
    return hub.tenant.client.patch(
        device_path(hub, device, "/twin/desired"), JsonPatch(patch), schemas.DesiredPatched
    )


def invoke(
    hub: HubSetup, device: SimulatedDevice, name: str, payload: Any = None, timeout_seconds: int = 5
) -> schemas.MethodResultPublic:
    return hub.tenant.client.post(
        device_path(hub, device, f"/methods/{name}"),
        schemas.MethodInvoke(payload=payload, timeout_seconds=timeout_seconds),
        schemas.MethodResultPublic,
    )


def send_message(
    hub: HubSetup, device: SimulatedDevice, body: str, ttl_seconds: int | None = None, **properties: str
) -> schemas.CloudToDevicePublic:
    return hub.tenant.client.post(
        device_path(hub, device, "/messages"),
        schemas.CloudToDeviceCreate(body=body, properties=properties, ttl_seconds=ttl_seconds),
        schemas.CloudToDevicePublic,
    )


def messages(hub: HubSetup, device: SimulatedDevice) -> dict[str, schemas.CloudToDevicePublic]:
    listed = hub.tenant.client.get_list(device_path(hub, device, "/messages"), schemas.CloudToDevicePublic)
    return {message.id: message for message in listed}


def connected(hub: HubSetup, device: SimulatedDevice) -> bool:
    return hub.tenant.client.get(device_path(hub, device, "/connection"), schemas.ConnectionPublic).connected


def api(hub: HubSetup, method: str, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
    """The API's bare answer, status and all (the typed client raises on a refusal instead)."""
    headers = {"Authorization": f"Bearer {token or hub.token}"}
    with httpx.Client(
        base_url=hub.server.url, verify=trust(hub.tls.ca_file), headers=headers, timeout=30
    ) as http:
        return http.request(method, path, json=body)


def refusal(
    hub: HubSetup, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, str]:
    """The HTTP status and error code the API answers a request it refuses with."""
    response = api(hub, method, path, body, token)
    assert not response.is_success, response.text
    return response.status_code, str(response.json()["error"]["code"])


# ---------------------------------------------------------------------- helpers: the device side


def events_topic(device: SimulatedDevice, properties: str = "") -> str:
    return f"devices/{device.device_id}/messages/events/{properties}"


def devicebound(device: SimulatedDevice) -> str:
    return f"devices/{device.device_id}/messages/devicebound/#"


def granted(codes: tuple[int, ...] | list[ReasonCode]) -> list[int]:
    return [code if isinstance(code, int) else code.value for code in codes]


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(client.messages), timeout)


def payload_of(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


async def session_ended(client: aiomqtt.Client, timeout: float = 5.0) -> float:
    """Seconds until the hub ends ``client``'s session (messages that arrive meanwhile are dropped)."""
    started = time.monotonic()

    async def drain() -> None:
        async for _message in client.messages:
            pass

    with pytest.raises(aiomqtt.MqttError):
        await asyncio.wait_for(drain(), timeout)
    return time.monotonic() - started


def response_of(topic: str) -> tuple[int, dict[str, str]]:
    """Status and parameters of ``$iothub/twin/res/{status}/?$rid=…&$version=…``."""
    path, _, query = topic.partition("?")
    assert path.startswith("$iothub/twin/res/"), topic
    return int(path.split("/")[3]), dict(parse_qsl(query))


async def twin_request(
    client: aiomqtt.Client, topic: str, rid: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Publish a twin request and wait for its answer: status, topic parameters, body."""
    await client.publish(f"{topic}?$rid={rid}", body)
    message = await next_message(client)
    status, parameters = response_of(message.topic.value)
    assert parameters["$rid"] == rid
    return status, parameters, payload_of(message)


class HubClosed(Exception):
    """The hub closed the connection."""


class RawDevice:
    """A bare MQTT 3.1.1 client over mutual TLS, on fleetward's codec: it does only what it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._packets = codec.PacketReader(1 << 20)
        self._received: deque[codec.Packet] = deque()

    async def send(self, packet: codec.Packet) -> None:
        self._writer.write(codec.encode(packet))
        await self._writer.drain()

    async def receive(self, timeout: float = 5.0) -> codec.Packet:
        async with asyncio.timeout(timeout):
            while not self._received:
                try:
                    data = await self._reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if not data:
                    raise HubClosed
                self._received.extend(self._packets.feed(data))
        return self._received.popleft()

    async def expect(self, kind: type[PacketT], timeout: float = 5.0) -> PacketT:
        packet = await self.receive(timeout)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet}"
        return packet

    async def closed_by_hub(self, timeout: float = 5.0) -> float:
        """Seconds until the hub closes the connection (whatever it sends meanwhile is dropped)."""
        started = time.monotonic()
        with contextlib.suppress(HubClosed):
            while True:
                await self.receive(max(0.01, timeout - (time.monotonic() - started)))
        return time.monotonic() - started

    def abort(self) -> None:
        """Drop the connection without a word, as a device that loses its network does."""
        self._writer.transport.abort()


@contextlib.asynccontextmanager
async def raw_device(
    hub: HubSetup, device: SimulatedDevice, *, keep_alive: int = 60, clean_session: bool = True
) -> AsyncIterator[tuple[RawDevice, codec.ConnAck]]:
    """A bare client connected as ``device``; yields it and the hub's CONNACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.hub_port, ssl=hub.device_tls(device))
    raw = RawDevice(reader, writer)
    try:
        await raw.send(codec.Connect(device.device_id, keep_alive, clean_session=clean_session))
        yield raw, await raw.expect(codec.ConnAck)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def devicebound_properties(device: SimulatedDevice, topic: str) -> dict[str, str]:
    prefix = f"devices/{device.device_id}/messages/devicebound/"
    assert topic.startswith(prefix), topic
    return dict(parse_qsl(topic[len(prefix) :]))


# ---------------------------------------------------------------------- telemetry


def test_telemetry_at_qos_0_and_1_is_stored_with_its_properties_and_qos_1_is_acknowledged_once_committed(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    """When ``publish(qos=1)`` returns, the PUBACK has come, and the message is already queryable."""

    async def run() -> None:
        async with hub.mqtt(device) as client:
            for number in range(3):
                await client.publish(
                    events_topic(device, f"%24.ct=application%2Fjson&%24.ce=utf-8&seq={number}"),
                    json.dumps({"temperature": 20 + number}),
                    qos=1,
                )
                stored = await asyncio.to_thread(telemetry, hub, device_id=device.device_id)
                assert len(stored) == number + 1
                assert stored[-1].properties == {
                    "$.ct": "application/json",
                    "$.ce": "utf-8",
                    "seq": str(number),
                }
                assert json.loads(stored[-1].body or "") == {"temperature": 20 + number}
            await client.publish(events_topic(device), b"\x00\xffraw", qos=0)
            await client.publish(events_topic(device, "note=a%20b%26c"), "plain", qos=0)

    asyncio.run(run())

    def qos_0_stored() -> list[schemas.TelemetryPublic]:
        stored = telemetry(hub, device_id=device.device_id)
        return stored[3:] if len(stored) == 5 else []

    stored = eventually(qos_0_stored, what="the QoS 0 telemetry stored")
    assert [(item.properties, item.body, item.body_base64) for item in stored] == [
        ({}, None, "AP9yYXc="),
        ({"note": "a b&c"}, "plain", "cGxhaW4="),
    ]
    assert all(item.device_id == device.device_id for item in stored)


def test_telemetry_range_queries_page_by_id_filter_by_time_and_device_and_stay_inside_the_tenant(
    hub: HubSetup, clock: FakeClock
) -> None:
    first = hub.enroll(SimulatedDevice("room-1", healthy_software()))
    second = hub.enroll(SimulatedDevice("room-2", healthy_software()))
    start = clock.now()

    async def publish(device: SimulatedDevice, *labels: str) -> None:
        async with hub.mqtt(device) as client:
            for label in labels:
                await client.publish(events_topic(device), label, qos=1)

    asyncio.run(publish(first, "a0", "a1", "a2"))
    clock.advance(10)
    asyncio.run(publish(second, "b0", "b1"))
    asyncio.run(publish(first, "a3", "a4", "a5"))

    everything = telemetry(hub)
    assert [item.body for item in everything] == ["a0", "a1", "a2", "b0", "b1", "a3", "a4", "a5"]
    ids = [item.id for item in everything if item.id is not None]
    assert ids == sorted(ids)
    assert len(ids) == 8
    assert [item.received_at for item in everything] == [start] * 3 + [start + dt.timedelta(seconds=10)] * 5
    assert [item.body for item in telemetry(hub, device_id=second.device_id)] == ["b0", "b1"]
    middle = (start + dt.timedelta(seconds=5)).isoformat()
    assert [item.body for item in telemetry(hub, until=middle)] == ["a0", "a1", "a2"]
    assert [item.body for item in telemetry(hub, since=middle, device_id=first.device_id)] == [
        "a3",
        "a4",
        "a5",
    ]

    pages: list[list[str | None]] = []
    after = 0
    while page := telemetry(hub, after_id=after, limit=3):
        pages.append([item.body for item in page])
        assert page[-1].id is not None
        after = page[-1].id
    assert pages == [["a0", "a1", "a2"], ["b0", "b1", "a3"], ["a4", "a5"]]

    # Another operator, with a tenant of their own, sees none of it.
    created = hub.tenant.client.post(
        "/v1/operators",
        schemas.OperatorCreate(email="lab@example.com", name="Lab", can_create_tenants=True),
        schemas.OperatorCreated,
    )
    with FleetwardClient(hub.server.url, created.token, ca_file=hub.tls.ca_file) as other_client:
        other = make_tenant(other_client, "microbiology-lab")
        path = f"/v1/tenants/{other.id}/telemetry"
        assert other_client.get_list(path, schemas.TelemetryPublic) == []
        assert other_client.get_list(path, schemas.TelemetryPublic, {"device_id": first.device_id}) == []
    theirs = f"/v1/tenants/{hub.tenant.id}/telemetry"
    assert refusal(hub, "GET", theirs, token=created.token) == (403, "no_role_in_tenant")
    stream = f"/v1/tenants/{hub.tenant.id}/telemetry/stream"
    headers = {"Authorization": f"Bearer {created.token}"}
    with (
        httpx.Client(
            base_url=hub.server.url, verify=trust(hub.tls.ca_file), headers=headers, timeout=10
        ) as http,
        http.stream("GET", stream) as response,
    ):
        assert response.status_code == 403


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as (event, data); comments are skipped."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                yield fields.get("event", "message"), fields["data"]
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_the_live_stream_sends_committed_telemetry_of_the_device_asked_for_as_server_sent_events(
    hub: HubSetup,
) -> None:
    watched = hub.enroll(SimulatedDevice("room-1", healthy_software()))
    other = hub.enroll(SimulatedDevice("room-2", healthy_software()))
    url = f"{hub.server.url}/v1/tenants/{hub.tenant.id}/telemetry/stream"

    async def run() -> list[tuple[str, schemas.TelemetryPublic]]:
        headers = {"Authorization": f"Bearer {hub.token}"}
        async with (
            httpx.AsyncClient(verify=trust(hub.tls.ca_file), headers=headers, timeout=10) as http,
            http.stream("GET", url, params={"device_id": watched.device_id}) as response,
            hub.mqtt(watched) as watched_client,
            hub.mqtt(other) as other_client,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")

            enough = asyncio.Event()

            async def publish() -> None:
                # The stream may start following a moment after its headers: publish until it has enough.
                # (Stopped by a flag: Python 3.11's wait_for, inside aiomqtt, can swallow a cancellation.)
                number = 0
                while not enough.is_set():
                    await other_client.publish(events_topic(other), f"other-{number}", qos=1)
                    await watched_client.publish(events_topic(watched, f"n={number}"), f"{number}", qos=1)
                    await asyncio.sleep(0.02)
                    number += 1

            publisher = asyncio.create_task(publish())
            received: list[tuple[str, schemas.TelemetryPublic]] = []
            try:
                async with asyncio.timeout(10):
                    async for event, data in sse_events(response):
                        received.append((event, schemas.TelemetryPublic.model_validate_json(data)))
                        if len(received) == 4:
                            break
            finally:
                enough.set()
                await publisher
            return received

    received = asyncio.run(run())
    assert {event for event, _item in received} == {"telemetry"}
    items = [item for _event, item in received]
    assert {item.device_id for item in items} == {watched.device_id}
    numbers = [int(item.body or "") for item in items]
    assert numbers == list(range(numbers[0], numbers[0] + 4))
    assert [item.properties for item in items] == [{"n": str(number)} for number in numbers]
    # What the stream showed is what was committed.
    stored = {item.body: item for item in telemetry(hub, device_id=watched.device_id, limit=1000)}
    assert all(
        stored[item.body].model_dump(exclude={"id"}) == item.model_dump(exclude={"id"}) for item in items
    )


# ---------------------------------------------------------------------- twins


def test_a_device_gets_and_reports_its_twin_and_receives_desired_patches_with_growing_versions(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with hub.mqtt(device) as client:
            await client.subscribe(TWIN_RESPONSES)
            await client.subscribe(TWIN_DESIRED)

            status, _, body = await twin_request(client, "$iothub/twin/GET/", "1")
            assert (status, json.loads(body)) == (
                200,
                {"desired": {"$version": 1}, "reported": {"$version": 1}},
            )

            reported = {"temperature": 21.5, "fan": {"speed": 3, "mode": "auto"}}
            status, parameters, body = await twin_request(
                client, "$iothub/twin/PATCH/properties/reported/", "2", json.dumps(reported).encode()
            )
            assert (status, parameters["$version"], body) == (204, "2", b"")
            seen = await asyncio.to_thread(twin, hub, device)
            assert seen.reported == {**reported, "$version": 2}

            removal = {"temperature": None, "fan": {"mode": None}}
            status, parameters, _ = await twin_request(
                client, "$iothub/twin/PATCH/properties/reported/", "3", json.dumps(removal).encode()
            )
            assert (status, parameters["$version"]) == (204, "3")
            assert (await asyncio.to_thread(twin, hub, device)).reported == {
                "fan": {"speed": 3},
                "$version": 3,
            }

            assert await asyncio.to_thread(connected, hub, device)
            patched = await asyncio.to_thread(
                patch_desired, hub, device, {"threshold": 30, "alarm": {"high": 35}}
            )
            assert (patched.version, patched.pushed) == (2, True)
            pushed = await next_message(client)
            assert pushed.topic.value == "$iothub/twin/PATCH/properties/desired/?$version=2"
            assert json.loads(payload_of(pushed)) == {"threshold": 30, "alarm": {"high": 35}, "$version": 2}

            patched = await asyncio.to_thread(patch_desired, hub, device, {"threshold": None})
            assert (patched.version, patched.pushed) == (3, True)
            pushed = await next_message(client)
            assert pushed.topic.value == "$iothub/twin/PATCH/properties/desired/?$version=3"
            assert json.loads(payload_of(pushed)) == {"threshold": None, "$version": 3}

            status, _, body = await twin_request(client, "$iothub/twin/GET/", "4")
            assert (status, json.loads(body)) == (
                200,
                {
                    "desired": {"alarm": {"high": 35}, "$version": 3},
                    "reported": {"fan": {"speed": 3}, "$version": 3},
                },
            )

    asyncio.run(run())
    eventually(lambda: not connected(hub, device), what="the session gone")
    patched = patch_desired(hub, device, {"threshold": 28})
    assert (patched.version, patched.pushed) == (4, False)
    assert twin(hub, device).desired == {"alarm": {"high": 35}, "threshold": 28, "$version": 4}


def test_twin_patches_over_32_kib_or_with_bad_keys_are_refused_with_413_and_400_and_change_nothing(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    reported = "$iothub/twin/PATCH/properties/reported/"

    async def run() -> float:
        async with hub.mqtt(device) as client:
            await client.subscribe(TWIN_RESPONSES)
            status, _, _ = await twin_request(client, reported, "ok", b'{"ok": true}')
            assert status == 204
            huge = json.dumps({"log": "x" * (32 * 1024)}).encode()
            status, _, body = await twin_request(client, reported, "huge", huge)
            assert status == 413
            assert "32768" in json.loads(body)["message"]
            for rid, bad in (
                ("dot", b'{"a.b": 1}'),
                ("dollar", b'{"$x": 1}'),
                ("nested", b'{"a": {"b c": 1}}'),
            ):
                status, _, _ = await twin_request(client, reported, rid, bad)
                assert status == 400, rid
            status, _, _ = await twin_request(client, reported, "json", b"[1, 2]")
            assert status == 400
            # The connection survived every refusal; a request without $rid ends it.
            status, _, body = await twin_request(client, "$iothub/twin/GET/", "after")
            assert status == 200
            assert json.loads(body)["reported"] == {"ok": True, "$version": 2}
            await client.publish("$iothub/twin/GET/", b"")
            return await session_ended(client)

    asyncio.run(run())
    assert hub_event(hub, device, "twin_too_large")
    assert hub_event(hub, device, "twin_bad_key", count=3)
    refused = hub_event(hub, device, "topic_refused")
    assert "$rid" in refused[0].detail
    assert twin(hub, device).reported == {"ok": True, "$version": 2}

    desired = device_path(hub, device, "/twin/desired")
    assert refusal(hub, "PATCH", desired, {"log": "x" * (32 * 1024)}) == (413, "twin_too_large")
    assert refusal(hub, "PATCH", desired, {"a.b": 1}) == (400, "twin_bad_key")
    assert twin(hub, device).desired == {"$version": 1}


# ---------------------------------------------------------------------- direct methods


def test_a_direct_method_reaches_the_device_and_returns_its_status_and_payload_or_a_timeout(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    def methods(name: str) -> str:
        return device_path(hub, device, f"/methods/{name}")

    requests: list[tuple[str, bytes]] = []

    async def answer(client: aiomqtt.Client) -> None:
        """Answer ``reboot`` with 200 and JSON, ``explode`` with 500 and text; stay silent to ``sleep``."""
        async for message in client.messages:
            topic = message.topic.value
            requests.append((topic, payload_of(message)))
            name = topic.split("/")[3]
            rid = dict(parse_qsl(topic.partition("?")[2]))["$rid"]
            if name == "reboot":
                body = json.dumps({"accepted": True, "echo": json.loads(payload_of(message))})
                await client.publish(f"$iothub/methods/res/200/?$rid={rid}", body)
            elif name == "explode":
                await client.publish(f"$iothub/methods/res/500/?$rid={rid}", "boom")

    async def run() -> None:
        async with hub.mqtt(device) as client:
            # Connected, but not listening for methods: as if offline.
            assert await asyncio.to_thread(refusal, hub, "POST", methods("reboot"), {}) == (
                404,
                "device_offline",
            )
            await client.subscribe(METHODS)
            responder = asyncio.create_task(answer(client))
            try:
                result = await asyncio.to_thread(invoke, hub, device, "reboot", {"delay": 5})
                assert (result.status, result.payload) == (200, {"accepted": True, "echo": {"delay": 5}})
                result = await asyncio.to_thread(invoke, hub, device, "explode")
                assert (result.status, result.payload) == (500, "boom")
                started = time.monotonic()
                refused = await asyncio.to_thread(
                    refusal, hub, "POST", methods("sleep"), {"timeout_seconds": 1}
                )
                assert refused == (504, "method_timeout")
                assert 0.9 < time.monotonic() - started < 5
                refused = await asyncio.to_thread(refusal, hub, "POST", methods("no%20spaces"), {})
                assert refused == (400, "bad_method_name")
            finally:
                responder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await responder

    asyncio.run(run())
    assert [topic.split("/?$rid=")[0] for topic, _ in requests] == [
        "$iothub/methods/POST/reboot",
        "$iothub/methods/POST/explode",
        "$iothub/methods/POST/sleep",
    ]
    assert json.loads(requests[0][1]) == {"delay": 5}
    assert requests[1][1] == b"null"
    eventually(lambda: not connected(hub, device), what="the session gone")
    assert refusal(hub, "POST", methods("reboot"), {}) == (404, "device_offline")


# ---------------------------------------------------------------------- cloud-to-device messages


def test_a_cloud_to_device_message_reaches_a_connected_device_and_is_completed_by_its_acknowledgement(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> tuple[schemas.CloudToDevicePublic, aiomqtt.Message]:
        async with hub.mqtt(device) as client:
            await client.subscribe(devicebound(device), qos=1)
            body = {"body": "open valve 3", "properties": {"kind": "command", "room": "lab 1"}}
            response = await asyncio.to_thread(api, hub, "POST", device_path(hub, device, "/messages"), body)
            assert response.status_code == 201
            sent = schemas.CloudToDevicePublic.model_validate_json(response.content)
            return sent, await next_message(client)

    sent, received = asyncio.run(run())
    assert (sent.state, sent.delivery_count) == ("pending", 0)
    assert devicebound_properties(device, received.topic.value) == {
        "$.mid": sent.id,
        "$.to": f"/devices/{device.device_id}/messages/deviceBound",
        "kind": "command",
        "room": "lab 1",
    }
    assert (payload_of(received), received.qos) == (b"open valve 3", 1)
    eventually(lambda: messages(hub, device)[sent.id].state == "completed", what="the message completed")
    completed = messages(hub, device)[sent.id]
    assert completed.completed_at is not None
    assert completed.delivery_count == 1


def test_messages_queued_offline_are_delivered_on_connect_at_most_50_pending_and_expired_ones_never(
    hub: HubSetup, device: SimulatedDevice, clock: FakeClock
) -> None:
    stale = send_message(hub, device, "stale", ttl_seconds=60)
    clock.advance(61)
    queued = []
    for number in range(50):
        clock.advance(0.001)  # the queue is in order of time; the fake clock would otherwise stand still
        queued.append(send_message(hub, device, f"m{number}"))
    assert [message.state for message in queued] == ["pending"] * 50
    assert refusal(hub, "POST", device_path(hub, device, "/messages"), {"body": "m50"}) == (
        409,
        "device_queue_full",
    )

    async def run() -> list[aiomqtt.Message]:
        async with hub.mqtt(device, clean_session=True) as client:
            await client.subscribe(devicebound(device), qos=1)
            return [await next_message(client) for _ in range(50)]

    received = asyncio.run(run())
    assert [payload_of(message) for message in received] == [f"m{number}".encode() for number in range(50)]
    ids = [devicebound_properties(device, message.topic.value)["$.mid"] for message in received]
    assert ids == [message.id for message in queued]

    def all_completed() -> dict[str, schemas.CloudToDevicePublic]:
        listed = messages(hub, device)
        return listed if all(listed[message.id].state == "completed" for message in queued) else {}

    listed = eventually(all_completed, what="50 messages completed")
    assert (listed[stale.id].state, listed[stale.id].delivery_count) == ("expired", 0)
    assert send_message(hub, device, "room again").state == "pending"


def test_a_message_sent_but_not_acknowledged_is_delivered_again_with_dup_on_the_next_connection(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    subscribe = codec.Subscribe(1, ((devicebound(device), 1),))

    async def first() -> codec.Publish:
        async with raw_device(hub, device) as (raw, connack):
            assert connack.return_code is codec.ConnectReturnCode.ACCEPTED
            await raw.send(subscribe)
            assert (await raw.expect(codec.SubAck)).return_codes == (1,)
            await asyncio.to_thread(send_message, hub, device, "calibrate")
            publish = await raw.expect(codec.Publish)
            raw.abort()
            return publish

    sent = asyncio.run(first())
    assert (sent.qos, sent.dup, sent.payload) == (1, False, b"calibrate")
    message_id = devicebound_properties(device, sent.topic)["$.mid"]
    eventually(lambda: messages(hub, device)[message_id].delivery_count == 1, what="the delivery counted")
    assert messages(hub, device)[message_id].state == "pending"

    async def again() -> codec.Publish:
        async with raw_device(hub, device) as (raw, _connack):
            await raw.send(subscribe)
            await raw.expect(codec.SubAck)
            publish = await raw.expect(codec.Publish)
            assert publish.packet_id is not None
            await raw.send(codec.PubAck(publish.packet_id))
            await raw.send(codec.Disconnect())
            return publish

    resent = asyncio.run(again())
    assert (resent.qos, resent.dup, resent.payload, resent.topic) == (1, True, b"calibrate", sent.topic)
    eventually(lambda: messages(hub, device)[message_id].state == "completed", what="the message completed")
    assert messages(hub, device)[message_id].delivery_count == 2


# ---------------------------------------------------------------------- sessions


def test_a_persistent_session_keeps_its_subscriptions_across_reconnects_and_a_clean_one_drops_them(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def subscribe_persistently() -> None:
        async with hub.mqtt(device, clean_session=False) as client:
            assert granted(await client.subscribe(METHODS)) == [0]
            assert granted(await client.subscribe(devicebound(device), qos=1)) == [1]

    async def answer_one_method(raw: RawDevice) -> schemas.MethodResultPublic:
        call = asyncio.create_task(asyncio.to_thread(invoke, hub, device, "ping", {"n": 1}))
        request = await raw.expect(codec.Publish)
        assert request.topic.startswith("$iothub/methods/POST/ping/?$rid=")
        rid = request.topic.partition("$rid=")[2]
        await raw.send(codec.Publish(f"$iothub/methods/res/200/?$rid={rid}", b'"pong"'))
        return await call

    async def come_back() -> codec.Publish:
        async with raw_device(hub, device, clean_session=False) as (raw, connack):
            assert connack.session_present
            waiting = await raw.expect(codec.Publish)  # queued while away, sent without a new SUBSCRIBE
            assert waiting.packet_id is not None
            await raw.send(codec.PubAck(waiting.packet_id))
            assert (await answer_one_method(raw)).payload == "pong"
            await raw.send(codec.Disconnect())
            return waiting

    async def come_back_clean() -> None:
        async with raw_device(hub, device, clean_session=True) as (raw, connack):
            assert not connack.session_present
            refused = await asyncio.to_thread(
                refusal, hub, "POST", device_path(hub, device, "/methods/ping"), {}
            )
            assert refused == (404, "device_offline")
            await raw.send(codec.Disconnect())
        async with raw_device(hub, device, clean_session=False) as (raw, connack):
            assert not connack.session_present
            await raw.send(codec.Disconnect())

    asyncio.run(subscribe_persistently())
    eventually(lambda: not connected(hub, device), what="the first session gone")
    send_message(hub, device, "while away")
    assert asyncio.run(come_back()).payload == b"while away"
    eventually(lambda: not connected(hub, device), what="the second session gone")
    asyncio.run(come_back_clean())


def test_a_second_connection_of_the_same_device_takes_over_and_the_first_is_closed_and_recorded(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with hub.mqtt(device, clean_session=False) as first:
            await first.subscribe(METHODS)
            async with raw_device(hub, device, clean_session=False) as (second, connack):
                assert connack.return_code is codec.ConnectReturnCode.ACCEPTED
                assert await session_ended(first) < 2
                # The newer connection inherits the persistent session and works.
                assert connack.session_present
                call = asyncio.create_task(asyncio.to_thread(invoke, hub, device, "ping"))
                request = await second.expect(codec.Publish)
                rid = request.topic.partition("$rid=")[2]
                await second.send(codec.Publish(f"$iothub/methods/res/204/?$rid={rid}", b""))
                assert (await call).status == 204
                await second.send(codec.Publish(events_topic(device), b"from the newer", qos=1, packet_id=7))
                assert await second.expect(codec.PubAck) == codec.PubAck(7)
                assert await asyncio.to_thread(connected, hub, device)

    asyncio.run(run())
    event = hub_event(hub, device, "session_taken_over")[0]
    assert event.device_id == device.device_id
    assert [item.body for item in telemetry(hub)] == ["from the newer"]


def test_a_device_silent_past_one_and_a_half_keep_alives_is_disconnected_and_pings_keep_it(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> float:
        async with raw_device(hub, device, keep_alive=1) as (raw, connack):
            assert connack.return_code is codec.ConnectReturnCode.ACCEPTED
            for _ in range(4):  # two seconds of pings, past 1.5 keep-alives
                await raw.send(codec.PingReq())
                await raw.expect(codec.PingResp)
                await asyncio.sleep(0.5)
            return await raw.closed_by_hub(timeout=6)

    silent_for = asyncio.run(run())
    assert 1.4 < silent_for < 4
    assert not connected(hub, device)


# ---------------------------------------------------------------------- quarantine and revocation


def test_quarantine_ends_the_session_within_a_second_then_allows_only_the_twin_until_released_in_place(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    bystander = hub.enroll(SimulatedDevice("room-2", healthy_software()))

    async def quarantined() -> float:
        async with hub.mqtt(device) as client, hub.mqtt(bystander) as other:
            await client.subscribe(METHODS)
            started = time.monotonic()
            await asyncio.to_thread(
                hub.tenant.client.post,
                device_path(hub, device, "/quarantine"),
                schemas.Quarantine(reason="tamper suspected"),
                schemas.DevicePublic,
            )
            await session_ended(client)
            ended = time.monotonic() - started
            await other.publish(events_topic(bystander), "undisturbed", qos=1)
            return ended

    assert asyncio.run(quarantined()) < 1.0

    async def twin_only() -> None:
        async with raw_device(hub, device) as (raw, connack):
            assert connack.return_code is codec.ConnectReturnCode.ACCEPTED
            await raw.send(codec.Subscribe(1, ((TWIN_RESPONSES, 0), (METHODS, 0), (devicebound(device), 1))))
            assert (await raw.expect(codec.SubAck)).return_codes == (
                0,
                codec.SUBACK_FAILURE,
                codec.SUBACK_FAILURE,
            )
            await raw.send(
                codec.Publish("$iothub/twin/PATCH/properties/reported/?$rid=r1", b'{"healthy": false}')
            )
            assert (await raw.expect(codec.Publish)).topic == "$iothub/twin/res/204/?$rid=r1&$version=2"
            # Recorded so far: the session's end and the two refused subscriptions.
            await asyncio.to_thread(hub_event, hub, device, "quarantined", count=3)
            await raw.send(codec.Publish(events_topic(device), b"not now"))
            assert await raw.closed_by_hub() < 2

    asyncio.run(twin_only())
    assert hub_event(hub, device, "quarantined", count=4)

    async def released_in_place() -> None:
        async with hub.mqtt(device) as client:
            assert granted(await client.subscribe(TWIN_RESPONSES)) == [0]
            await asyncio.to_thread(
                hub.tenant.client.post,
                device_path(hub, device, "/release"),
                schemas.Quarantine(),
                schemas.DevicePublic,
            )

            async def methods_granted() -> bool:
                return granted(await client.subscribe(METHODS)) == [0]

            await eventually_async(methods_granted, what="the session upgraded")
            await client.publish(events_topic(device), "healthy again", qos=1)

    asyncio.run(released_in_place())
    assert [item.body for item in telemetry(hub)] == ["undisturbed", "healthy again"]


def test_revoking_one_certificate_ends_its_session_but_not_a_session_on_the_devices_newer_certificate(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    neighbour = hub.enroll(SimulatedDevice("room-2", healthy_software()))
    assert device.credential is not None
    assert neighbour.credential is not None
    old_tls, old_serial = hub.device_tls(device), device.credential.issued.serial
    hub.enroll(device, claim=False)
    assert device.credential.issued.serial != old_serial

    def revoke(serial: str) -> None:
        hub.tenant.client.post(
            f"/v1/tenants/{hub.tenant.id}/certificates/{serial}/revoke",
            schemas.Revoke(),
            schemas.CertificatePublic,
        )

    async def run() -> float:
        async with hub.mqtt(device) as renewed, hub.mqtt(neighbour) as other:
            await asyncio.to_thread(revoke, old_serial)
            assert neighbour.credential is not None
            started = time.monotonic()
            await asyncio.to_thread(revoke, neighbour.credential.issued.serial)
            # Trust changes are followed in order: once the neighbour's ends, the old serial was seen too.
            await session_ended(other)
            ended = time.monotonic() - started
            for refused in (hub.mqtt(device, tls_context=old_tls), hub.mqtt(neighbour)):
                with pytest.raises(aiomqtt.MqttError):
                    async with refused:
                        pass
            await renewed.publish(events_topic(device), "still trusted", qos=1)
            assert await asyncio.to_thread(connected, hub, device)
            return ended

    assert asyncio.run(run()) < 1.0
    assert [item.body for item in telemetry(hub)] == ["still trusted"]
    assert hub_event(hub, device, "certificate_revoked")
    assert hub_event(hub, neighbour, "certificate_revoked")
