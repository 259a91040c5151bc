"""Module sessions (IoT Hub's module identities): a device's own session and each of its modules' are
independent sessions, with the device's certificate; a module has its own telemetry topic, its own twin
and its own direct methods, and no cloud-to-device messages. Real TLS, a bare client as the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from fleetward.api import schemas
from fleetward.bus import subjects
from fleetward.errors import AccessRefused
from fleetward.hub import codec
from fleetward.hub.codec import Connect, ConnectReturnCode
from fleetward.hub.session import ConnectRefused, PeerIdentity, SessionKey, check_session
from fleetward.hub.topics import (
    Subscription,
    Telemetry,
    TwinGet,
    classify_publish,
    classify_subscribe,
)
from fleetward.sim.fleet import SimulatedDevice
from tests.conftest import HubSetup, healthy_software
from tests.test_hub_behaviour import (
    JsonPatch,
    RawDevice,
    device_path,
    hub_event,
    refusal,
    telemetry,
)

MODULE = "fleetward-agent"
DEVICE = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture
def device(hub: HubSetup) -> SimulatedDevice:
    return hub.enroll(SimulatedDevice("room-1", healthy_software()))


@contextlib.asynccontextmanager
async def session(
    hub: HubSetup, device: SimulatedDevice, client_id: str, username: str | None = None
) -> AsyncIterator[tuple[RawDevice, codec.ConnAck]]:
    """A bare client with the device's certificate and ``client_id``; yields it and the CONNACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.hub_port, ssl=hub.device_tls(device))
    raw = RawDevice(reader, writer)
    try:
        await raw.send(codec.Connect(client_id, 60, username=username))
        yield raw, await raw.expect(codec.ConnAck)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def module_path(hub: HubSetup, device: SimulatedDevice, rest: str = "", module: str = MODULE) -> str:
    return device_path(hub, device, f"/modules/{module}{rest}")


def module_events(device: SimulatedDevice, module: str = MODULE, properties: str = "") -> str:
    return f"devices/{device.device_id}/modules/{module}/messages/events/{properties}"


async def subscribe(raw: RawDevice, *filters: str, packet_id: int = 1) -> tuple[int, ...]:
    await raw.send(codec.Subscribe(packet_id, tuple((item, 1) for item in filters)))
    return (await raw.expect(codec.SubAck)).return_codes


# ---------------------------------------------------------------------- the pure policy


def test_a_client_id_naming_a_module_of_the_certificate_s_device_opens_that_module_s_session() -> None:
    identity = _identity()
    connect = Connect(
        f"{DEVICE}/$edgeAgent", 60, username=f"hub.example.com/{DEVICE}/$edgeAgent/?api-version=1"
    )
    assert check_session(connect, identity, 1740) == (60, SessionKey(DEVICE, "$edgeAgent"))
    assert check_session(replace(connect, client_id=DEVICE, username=None), identity, 1740)[1] == SessionKey(
        DEVICE
    )


@pytest.mark.parametrize(
    ("client_id", "username", "code"),
    [
        (f"{DEVICE}/a.b", None, "module_id_invalid"),
        (f"{DEVICE}/a*", None, "module_id_invalid"),
        (f"{DEVICE}/>", None, "module_id_invalid"),
        (f"{DEVICE}/", None, "module_id_invalid"),
        (f"{DEVICE}/-x", None, "module_id_invalid"),
        (f"{DEVICE}/{'m' * 65}", None, "module_id_invalid"),
        (f"{DEVICE}/a/b", None, "module_id_invalid"),
        (f"{OTHER}/{MODULE}", None, "client_id_mismatch"),
        (f"{DEVICE}/{MODULE}", f"h/{DEVICE}/?api-version=1", "username_mismatch"),
        (f"{DEVICE}/{MODULE}", f"h/{DEVICE}/other/?api-version=1", "username_mismatch"),
        (DEVICE, f"h/{DEVICE}/{MODULE}/?api-version=1", "username_mismatch"),
    ],
)
def test_a_module_connect_that_does_not_name_a_valid_module_of_the_device_is_refused(
    client_id: str, username: str | None, code: str
) -> None:
    with pytest.raises(ConnectRefused) as refused:
        check_session(Connect(client_id, 60, username=username), _identity(), 1740)
    assert refused.value.code == code
    assert refused.value.return_code in (
        ConnectReturnCode.IDENTIFIER_REJECTED,
        ConnectReturnCode.BAD_USERNAME_OR_PASSWORD,
    )


def test_a_module_publishes_telemetry_on_its_own_topic_and_has_no_cloud_to_device_messages() -> None:
    topic = f"devices/{DEVICE}/modules/{MODULE}/messages/events/a=1"
    assert classify_publish(DEVICE, topic, module_id=MODULE) == Telemetry((("a", "1"),))
    assert classify_publish(DEVICE, "$iothub/twin/GET/?$rid=1", module_id=MODULE) == TwinGet("1")
    for refused_topic in (
        f"devices/{DEVICE}/messages/events/",  # the device's own topic
        f"devices/{DEVICE}/modules/other/messages/events/",  # another module's
    ):
        with pytest.raises(AccessRefused):
            classify_publish(DEVICE, refused_topic, module_id=MODULE)
    with pytest.raises(AccessRefused):  # and the device may not publish as its module
        classify_publish(DEVICE, topic)
    assert classify_subscribe(DEVICE, "$iothub/methods/POST/#", module_id=MODULE) is Subscription.METHODS
    with pytest.raises(AccessRefused):
        classify_subscribe(DEVICE, f"devices/{DEVICE}/messages/devicebound/#", module_id=MODULE)


def _identity() -> PeerIdentity:
    return PeerIdentity("t", DEVICE, "1", dt.datetime(2100, 1, 1, tzinfo=dt.UTC))


# ---------------------------------------------------------------------- through the hub


def test_a_device_session_and_a_module_session_coexist_and_module_telemetry_is_stored_with_its_module(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with (
            session(hub, device, device.device_id) as (own, own_ack),
            session(
                hub,
                device,
                f"{device.device_id}/{MODULE}",
                f"127.0.0.1/{device.device_id}/{MODULE}/?api-version=2021-04-12",
            ) as (module, module_ack),
        ):
            assert own_ack.return_code == module_ack.return_code == ConnectReturnCode.ACCEPTED
            await own.send(
                codec.Publish(f"devices/{device.device_id}/messages/events/", b"app", qos=1, packet_id=1)
            )
            assert await own.expect(codec.PubAck) == codec.PubAck(1)
            await module.send(
                codec.Publish(module_events(device, properties="k=v"), b"agent", qos=1, packet_id=2)
            )
            assert await module.expect(codec.PubAck) == codec.PubAck(2)
            both = await asyncio.to_thread(
                hub.tenant.client.get, device_path(hub, device, "/connection"), schemas.ConnectionPublic
            )
            mine = await asyncio.to_thread(
                hub.tenant.client.get, module_path(hub, device, "/connection"), schemas.ConnectionPublic
            )
            assert both.connected
            assert (mine.connected, mine.module_id) == (True, MODULE)

    asyncio.run(run())
    stored = telemetry(hub, device_id=device.device_id)
    assert [(item.body, item.module_id) for item in stored] == [("app", None), ("agent", MODULE)]
    only = telemetry(hub, device_id=device.device_id, module_id=MODULE)
    assert [(item.body, item.properties) for item in only] == [("agent", {"k": "v"})]
    assert not [
        event for event in hub.hub_events(device_id=device.device_id) if event.code == "session_taken_over"
    ]


def test_the_same_module_connecting_twice_takes_over_only_that_module_s_session(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with (
            session(hub, device, device.device_id) as (own, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (first, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (second, ack),
        ):
            assert ack.return_code == ConnectReturnCode.ACCEPTED
            await first.closed_by_hub()
            await second.send(codec.PingReq())
            await second.expect(codec.PingResp)
            await own.send(codec.PingReq())
            await own.expect(codec.PingResp)

    asyncio.run(run())
    assert hub_event(hub, device, "session_taken_over")


def test_a_module_twin_is_its_own_read_and_patched_by_the_module_and_the_api_with_desired_pushed(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with (
            session(hub, device, device.device_id) as (own, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (module, _),
        ):
            filters = ("$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#")
            assert await subscribe(module, *filters) == (1, 1)
            assert await subscribe(own, *filters) == (1, 1)
            await module.send(
                codec.Publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"agent": "1.4"}')
            )
            answer = await module.expect(codec.Publish)
            assert answer.topic == "$iothub/twin/res/204/?$rid=1&$version=2"
            patched = await asyncio.to_thread(
                hub.tenant.client.patch,
                module_path(hub, device, "/twin/desired"),
                JsonPatch({"interval": 5}),
                schemas.DesiredPatched,
            )
            assert (patched.module_id, patched.version, patched.pushed) == (MODULE, 2, True)
            pushed = await module.expect(codec.Publish)
            assert pushed.topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
            assert json.loads(pushed.payload) == {"interval": 5, "$version": 2}
            await module.send(codec.Publish("$iothub/twin/GET/?$rid=2", b""))
            got = await module.expect(codec.Publish)
            assert json.loads(got.payload) == {
                "desired": {"interval": 5, "$version": 2},
                "reported": {"agent": "1.4", "$version": 2},
            }
            with pytest.raises(TimeoutError):  # the device's own session hears nothing of it
                await own.receive(timeout=0.3)

    asyncio.run(run())
    module_twin = hub.tenant.client.get(module_path(hub, device, "/twin"), schemas.TwinPublic)
    assert module_twin.module_id == MODULE
    assert module_twin.reported == {"agent": "1.4", "$version": 2}
    device_twin = hub.tenant.client.get(device_path(hub, device, "/twin"), schemas.TwinPublic)
    assert device_twin.desired == {"$version": 1}
    assert device_twin.reported == {"$version": 1}


def test_a_direct_method_sent_to_a_module_reaches_that_module_and_is_answered(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    def invoke(path: str) -> schemas.MethodResultPublic:
        return hub.tenant.client.post(
            path, schemas.MethodInvoke(payload={"x": 1}, timeout_seconds=5), schemas.MethodResultPublic
        )

    async def run() -> None:
        async with (
            session(hub, device, device.device_id) as (own, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (module, _),
        ):
            assert await subscribe(module, "$iothub/methods/POST/#") == (1,)
            assert await subscribe(own, "$iothub/methods/POST/#") == (1,)
            call = asyncio.create_task(
                asyncio.to_thread(invoke, module_path(hub, device, "/methods/fleetward.status"))
            )
            request = await module.expect(codec.Publish)
            assert request.topic.startswith("$iothub/methods/POST/fleetward.status/?$rid=")
            rid = request.topic.partition("$rid=")[2]
            await module.send(codec.Publish(f"$iothub/methods/res/200/?$rid={rid}", b'{"up": true}'))
            result = await call
            assert (result.status, result.payload) == (200, {"up": True})
            with pytest.raises(TimeoutError):
                await own.receive(timeout=0.3)

    asyncio.run(run())
    assert refusal(hub, "POST", module_path(hub, device, "/methods/x", module="other"), {}) == (
        404,
        "device_offline",
    )
    assert refusal(hub, "GET", module_path(hub, device, "/twin", module="a.b")) == (400, "module_id_invalid")


def test_only_the_session_a_method_was_sent_to_can_answer_it(hub: HubSetup, device: SimulatedDevice) -> None:
    """Another session of the device (here a module) that answers with the request id it guessed is
    ignored: the caller gets the answer of the session it called."""

    def invoke() -> schemas.MethodResultPublic:
        return hub.tenant.client.post(
            device_path(hub, device, "/methods/reboot"),
            schemas.MethodInvoke(payload=None, timeout_seconds=5),
            schemas.MethodResultPublic,
        )

    async def run() -> schemas.MethodResultPublic:
        async with (
            session(hub, device, device.device_id) as (own, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (module, _),
        ):
            assert await subscribe(own, "$iothub/methods/POST/#") == (1,)
            call = asyncio.create_task(asyncio.to_thread(invoke))
            request = await own.expect(codec.Publish)
            rid = request.topic.partition("$rid=")[2]
            await module.send(codec.Publish(f"$iothub/methods/res/200/?$rid={rid}", b'"forged"'))
            await asyncio.sleep(0.2)
            assert not call.done()
            await own.send(codec.Publish(f"$iothub/methods/res/202/?$rid={rid}", b'"genuine"'))
            return await call

    result = asyncio.run(run())
    assert (result.status, result.payload) == (202, "genuine")


def test_a_module_may_not_subscribe_to_cloud_to_device_messages(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with session(hub, device, f"{device.device_id}/{MODULE}") as (module, ack):
            assert ack.return_code == ConnectReturnCode.ACCEPTED
            codes = await subscribe(
                module, f"devices/{device.device_id}/messages/devicebound/#", "$iothub/methods/POST/#"
            )
            assert codes == (codec.SUBACK_FAILURE, 1)

    asyncio.run(run())
    assert hub_event(hub, device, "topic_refused")


def test_revoking_the_device_ends_its_own_session_and_its_modules(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    async def run() -> None:
        async with (
            session(hub, device, device.device_id) as (own, _),
            session(hub, device, f"{device.device_id}/{MODULE}") as (module, _),
            session(hub, device, f"{device.device_id}/$edgeAgent") as (edge, _),
        ):
            await asyncio.to_thread(
                hub.tenant.client.post,
                f"/v1/tenants/{hub.tenant.id}/devices/{device.device_id}/revoke",
                schemas.Revoke(),
                schemas.RevokedDevice,
            )
            ended = await asyncio.gather(own.closed_by_hub(), module.closed_by_hub(), edge.closed_by_hub())
            assert all(seconds < 5 for seconds in ended)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("suffix", "code", "return_code"),
    [
        ("/a.b", "module_id_invalid", ConnectReturnCode.IDENTIFIER_REJECTED),
        ("/x*", "module_id_invalid", ConnectReturnCode.IDENTIFIER_REJECTED),
    ],
)
def test_a_module_id_with_a_forbidden_character_is_refused(
    hub: HubSetup, device: SimulatedDevice, suffix: str, code: str, return_code: ConnectReturnCode
) -> None:
    async def run() -> None:
        async with session(hub, device, device.device_id + suffix) as (_, ack):
            assert ack.return_code == return_code

    asyncio.run(run())
    assert hub_event(hub, device, code)


def test_a_module_client_id_with_another_device_s_id_is_refused(
    hub: HubSetup, device: SimulatedDevice
) -> None:
    other = hub.enroll(SimulatedDevice("room-2", healthy_software()))

    async def run() -> None:
        async with session(hub, device, f"{other.device_id}/{MODULE}") as (_, ack):
            assert ack.return_code == ConnectReturnCode.IDENTIFIER_REJECTED

    asyncio.run(run())
    assert hub_event(hub, device, "client_id_mismatch")


@pytest.mark.parametrize("module", ["fleetward-agent", "$edgeAgent", "m", "9_$-" + "x" * 60])
def test_a_module_session_has_its_own_bus_subject_that_names_it_back(module: str) -> None:
    tenant = "01df5779-fb37-4dfc-937c-4dd58adf2ba1"
    subject = subjects.device(tenant, DEVICE, module)
    assert subject != subjects.device(tenant, DEVICE)
    assert subject.startswith(subjects.device(tenant, DEVICE) + ".")
    assert subjects.session_of(subject) == (tenant, DEVICE, module)
    assert subjects.session_of(subjects.device(tenant, DEVICE)) == (tenant, DEVICE, None)
    with pytest.raises(ValueError, match="module"):
        subjects.device_of(subject)
