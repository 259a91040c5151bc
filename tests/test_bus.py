"""The bus, both implementations with the same checks: the in-process bus always, NATS where it runs.

NATS tests skip with a reason where no server answers at ``FLEETWARD_TEST_NATS_URL`` (default
``nats://127.0.0.1:4222``), and fail instead under ``FLEETWARD_REQUIRE_SERVICES=1``. Each NATS test uses
its own subject prefix, so that test runs sharing one server do not hear each other.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

from fleetward.bus import LocalBus, Message, NoResponders, RequestTimedOut, bus_for, subjects
from fleetward.bus.base import Bus, Subscription, check_subject
from fleetward.bus.natsbus import NatsBus, redact
from fleetward.config import Settings
from fleetward.errors import ConfigurationError, TransportError
from fleetward.hub.feed import TelemetryFeed, decode_batch, encode, encode_batch
from fleetward.hub.routing import Answer, Command, Op, session_of
from fleetward.hub.store import TelemetryMessage
from fleetward.hub.topics import Subscription as TopicSubscription
from fleetward.server import free_port
from tests.conftest import REQUIRE_SERVICES

NATS_URL = os.environ.get("FLEETWARD_TEST_NATS_URL", "nats://127.0.0.1:4222")


def nats_url() -> str:
    """The test NATS server's URL; skips (or fails, under FLEETWARD_REQUIRE_SERVICES=1) without one."""
    parts = urlsplit(NATS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=2):
            pass
    except OSError as error:
        reason = f"NATS is not reachable at {NATS_URL}: {type(error).__name__}"
        if REQUIRE_SERVICES:
            pytest.fail(reason + " (FLEETWARD_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    return NATS_URL


def unique_prefix() -> str:
    return f"fwtest{secrets.token_hex(6)}"


@pytest.fixture(params=["local", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    made: Bus = LocalBus() if request.param == "local" else NatsBus(nats_url(), prefix=unique_prefix())
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


async def responder(bus: Bus, subscription: Subscription, answer: Callable[[bytes], bytes | None]) -> None:
    """Answer each request on ``subscription`` with ``answer(payload)`` (None: stay silent)."""
    async for message in subscription:
        reply = answer(message.payload)
        if reply is not None:
            bus.respond(message, reply)


async def running(work: Awaitable[None]) -> asyncio.Task[None]:
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------------- request and reply


async def test_a_request_gets_the_first_answer_of_a_subscriber(bus: Bus) -> None:
    subscription = bus.subscribe("device.t1.d1", max_pending=10)
    await subscription.settled()
    task = await running(responder(bus, subscription, lambda payload: b"re: " + payload))
    try:
        assert await bus.request("device.t1.d1", b"ping", 2) == b"re: ping"
        assert await bus.request("device.t1.d1", b"again", 2) == b"re: again"
    finally:
        await stop(task)
        await subscription.aclose()


async def test_a_request_nobody_listens_to_fails_at_once_with_no_responders(bus: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(NoResponders) as raised:
        await bus.request("device.t1.nobody", b"anyone?", 5)
    assert time.monotonic() - started < 1
    assert isinstance(raised.value, TransportError)
    assert raised.value.code == "no_responders"


async def test_a_request_whose_subscriber_stays_silent_times_out(bus: Bus) -> None:
    subscription = bus.subscribe("device.t1.silent", max_pending=10)
    await subscription.settled()
    task = await running(responder(bus, subscription, lambda _payload: None))
    try:
        started = time.monotonic()
        with pytest.raises(RequestTimedOut):
            await bus.request("device.t1.silent", b"hello?", 0.3)
        assert 0.25 < time.monotonic() - started < 2
    finally:
        await stop(task)
        await subscription.aclose()


# ---------------------------------------------------------------------- publish and subscribe


async def test_a_slow_subscriber_keeps_the_newest_messages_and_counts_the_ones_it_missed(bus: Bus) -> None:
    subscription = bus.subscribe("telemetry.t1.d1", max_pending=3)
    await subscription.settled()
    for number in range(10):
        bus.publish("telemetry.t1.d1", b"%d" % number)
    await eventually(lambda: subscription.missed == 7, "seven messages missed")
    received = [(await anext(subscription)).payload for _ in range(3)]
    assert received == [b"7", b"8", b"9"]
    assert subscription.missed == 7
    await subscription.aclose()


async def test_a_trailing_wildcard_matches_one_token_and_nothing_else(bus: Bus) -> None:
    subscription = bus.subscribe("telemetry.t1.*", max_pending=10)
    await subscription.settled()
    assert bus.may_deliver("telemetry.t1.d1")
    for subject in (
        "telemetry.t1.d1",
        "telemetry.t2.d1",
        "telemetry.t1.d1.x",
        "telemetry.t1",
        "telemetry.t1.d2",
    ):
        bus.publish(subject, subject.encode())
    first, second = await anext(subscription), await anext(subscription)
    assert [first.subject, second.subject] == ["telemetry.t1.d1", "telemetry.t1.d2"]
    assert first == Message("telemetry.t1.d1", b"telemetry.t1.d1")
    await subscription.aclose()


async def test_subjects_added_and_discarded_on_one_subscription_start_and_stop_arriving(bus: Bus) -> None:
    subscription = bus.subscribe(max_pending=10)
    subscription.add("device.t1.a")
    subscription.add("device.t1.b")
    await subscription.settled()
    bus.publish("device.t1.a", b"1")
    bus.publish("device.t1.b", b"2")
    assert [(await anext(subscription)).payload for _ in range(2)] == [b"1", b"2"]
    subscription.discard("device.t1.a")
    subscription.discard("device.t1.never-added")
    await subscription.settled()
    with pytest.raises(NoResponders):
        await bus.request("device.t1.a", b"", 2)
    bus.publish("device.t1.a", b"3")
    bus.publish("device.t1.b", b"4")
    assert (await anext(subscription)).payload == b"4"
    await subscription.aclose()


async def test_closing_a_subscription_ends_its_reader_and_its_subjects(bus: Bus) -> None:
    subscription = bus.subscribe("device.t1.closing", max_pending=10)
    await subscription.settled()
    received: list[Message] = []

    async def read() -> None:
        async for message in subscription:
            received.append(message)

    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0)
    await subscription.aclose()
    await asyncio.wait_for(reader, 2)
    await asyncio.sleep(0.1)  # NATS has the unsubscription
    with pytest.raises(NoResponders):
        await bus.request("device.t1.closing", b"", 2)
    assert received == []


# ---------------------------------------------------------------------- NATS itself


async def test_nats_buses_under_different_prefixes_do_not_hear_each_other() -> None:
    url = nats_url()
    first, second = NatsBus(url, prefix=unique_prefix()), NatsBus(url, prefix=unique_prefix())
    await first.start()
    await second.start()
    try:
        async with first.subscribe("device.t1.d1", max_pending=10) as subscription:
            await subscription.settled()
            with pytest.raises(NoResponders):
                await second.request("device.t1.d1", b"", 2)
            second.publish("device.t1.d1", b"not for you")
            first.publish("device.t1.d1", b"for you")
            assert (await asyncio.wait_for(anext(subscription), 2)).payload == b"for you"
    finally:
        await first.close()
        await second.close()


async def test_a_nats_bus_that_cannot_reach_its_server_says_so_at_start() -> None:
    dead = NatsBus(f"nats://127.0.0.1:{free_port()}", connect_timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        await dead.start()
    assert time.monotonic() - started < 5
    assert raised.value.code == "bus_unreachable"
    assert "NATS is not reachable at nats://127.0.0.1:" in raised.value.message
    with pytest.raises(TransportError) as unavailable:
        await dead.request("device.t1.d1", b"", 1)
    assert unavailable.value.code == "bus_unavailable"
    await dead.close()  # harmless


def nats_server(binary: str, port: int) -> subprocess.Popen[bytes]:
    """A NATS server of the test's own, on ``port`` (ready when this returns)."""
    process = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("nats-server did not start") from None
            time.sleep(0.05)


async def test_a_nats_bus_fails_fast_while_nats_is_down_and_reconnects_by_itself_when_it_is_back() -> None:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("no nats-server binary to run a NATS of the test's own")
    port = free_port()
    server = nats_server(binary, port)
    bus = NatsBus(f"nats://127.0.0.1:{port}", prefix=unique_prefix())
    await bus.start()
    subscription = bus.subscribe("device.t1.d1", max_pending=10)
    await subscription.settled()
    task = await running(responder(bus, subscription, lambda payload: payload.upper()))

    async def outcome() -> str:
        try:
            return (await bus.request("device.t1.d1", b"up?", 1)).decode()
        except TransportError as error:
            return error.code

    try:
        assert await outcome() == "UP?"
        server.terminate()
        server.wait(timeout=10)
        await eventually(lambda: not bus.connected, "the bus sees NATS gone")
        started = time.monotonic()
        assert await outcome() == "bus_unavailable"
        assert time.monotonic() - started < 0.5  # at once, not after a timeout
        bus.publish("device.t1.d1", b"kept for later")  # buffered, never raised
        server = nats_server(binary, port)
        deadline = time.monotonic() + 15
        while (answer := await outcome()) != "UP?":  # re-subscribed by itself
            assert time.monotonic() < deadline, answer
            await asyncio.sleep(0.2)
    finally:
        await stop(task)
        await bus.close()
        server.terminate()
        server.wait(timeout=10)


def telemetry_message(device_id: str, number: int, tenant_id: str = "t1") -> TelemetryMessage:
    at = dt.datetime(2026, 11, 23, tzinfo=dt.UTC) + dt.timedelta(seconds=number)
    return TelemetryMessage(tenant_id, device_id, at, (("n", str(number)),), b"\x00%d" % number)


async def test_a_live_stream_in_one_process_sees_the_telemetry_another_commits_for_its_device_only() -> None:
    url, prefix = nats_url(), unique_prefix()
    hub_side, api_side = NatsBus(url, prefix=prefix), NatsBus(url, prefix=prefix)
    await hub_side.start()
    await api_side.start()
    watched, other = "a" * 64, "b" * 64
    try:
        committed, streamed = TelemetryFeed(100, hub_side), TelemetryFeed(100, api_side)
        follow = streamed.follow("t1", watched)
        first = asyncio.ensure_future(anext(follow))
        number = 0
        while not first.done():  # until the stream's subscription is in place
            committed.publish([telemetry_message(other, number), telemetry_message(watched, number)])
            number += 1
            await asyncio.wait([first], timeout=0.05)
        received = [(await first)[0]]
        committed.publish([telemetry_message(other, 90), telemetry_message(watched, 91)])
        committed.publish([telemetry_message(watched, 92, tenant_id="t2")])
        while received[-1].body != telemetry_message(watched, 91).body:
            received.append((await asyncio.wait_for(anext(follow), 5))[0])
        await follow.aclose()
    finally:
        await hub_side.close()
        await api_side.close()
    assert {message.device_id for message in received} == {watched}
    assert received[-1] == telemetry_message(watched, 91)


def test_a_malformed_telemetry_batch_is_refused_and_a_good_one_round_trips() -> None:
    items = [telemetry_message("a" * 64, 1), telemetry_message("b" * 64, 2)]
    assert decode_batch(encode_batch([encode(item) for item in items])) == items
    for bad in (
        b"",
        b"{}",
        b"[1]",
        b'[[1,"t1","d1","not a time",[],""]]',
        b'[[1,2,"d1","2026-01-01",[],""]]',
    ):
        with pytest.raises(ValueError, match="not a telemetry batch"):
            decode_batch(bad)


# ---------------------------------------------------------------------- device commands on the bus


def test_device_commands_and_answers_round_trip_through_their_encoding() -> None:
    commands = [
        Command(Op.METHOD, name="reboot", payload=b'{"delay": 5}', timeout_seconds=30.0),
        Command(Op.DESIRED, payload=b'{"threshold": 30}', version=7),
        Command(Op.MESSAGES),
        Command(Op.STATE),
        Command(Op.TAKEOVER, name="0123456789abcdef", since_ns=1_700_000_000_000_000_000),
    ]
    for command in commands:
        assert Command.decode(command.encode()) == command
    answers = [
        Answer(status=200, payload=b"\x00\xff"),
        Answer(error="method_timeout", message="too slow"),
        Answer(connected=True),
        Answer(pushed=True),
        Answer(session=("methods", "twin-desired")),
        Answer(session=()),
        Answer(newer=True),
    ]
    for answer in answers:
        assert Answer.decode(answer.encode()) == answer
    assert session_of(("methods", "from-a-newer-version")) == {TopicSubscription.METHODS}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"op": "method"}',
        b'{"op": "reboot", "name": "", "payload": "", "version": 0, "timeout_seconds": 0, "since_ns": 0}',
        b'{"op": "method", "name": 1, "payload": "", "version": 0, "timeout_seconds": 0, "since_ns": 0}',
        b'{"op": "method", "name": "", "payload": "%%%", "version": 0, "timeout_seconds": 0, "since_ns": 0}',
        b'{"op": "state", "name": "", "payload": "", "version": true, "timeout_seconds": 0, "since_ns": 0}',
    ],
)
def test_a_malformed_device_command_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"not a device command|not JSON|not a JSON object"):
        Command.decode(data)


@pytest.mark.parametrize(
    "data",
    [b"{}", b'{"status": "200"}', Answer().encode().replace(b'"session":null', b'"session":[1]')],
)
def test_a_malformed_device_answer_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a device answer"):
        Answer.decode(data)


@pytest.mark.parametrize(
    "url",
    ["", "http://127.0.0.1:4222", "nats://", "127.0.0.1:4222", "nats://a:4222,redis://b:6379"],
)
def test_a_bus_url_that_is_not_nats_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        NatsBus(url)


def test_a_bus_url_with_a_password_is_never_shown_with_it() -> None:
    assert redact("nats://fleet:s3cret@nats.example.com:4222") == "nats://***@nats.example.com:4222"
    assert NatsBus("nats://fleet:s3cret@127.0.0.1:4222").url == "nats://***@127.0.0.1:4222"
    assert "s3cret" not in repr(Settings(bus_url="nats://fleet:s3cret@127.0.0.1:4222"))


# ---------------------------------------------------------------------- subjects and settings


@pytest.mark.parametrize(
    "bad",
    [
        "a.b",  # a dot would add a level
        "*",  # a wildcard would widen it
        ">",
        "",
        "t 1",
        "d\n1",
        "d" * 129,
    ],
)
def test_ids_that_are_not_safe_subject_tokens_are_refused(bad: str) -> None:
    for build in (
        lambda: subjects.device("t1", bad),
        lambda: subjects.device(bad, "d1"),
        lambda: subjects.telemetry(bad),
        lambda: subjects.device_of(f"device.t1.{bad}"),
    ):
        with pytest.raises(ValueError, match=r"not a safe subject token|not a device subject"):
            build()


def test_subjects_are_safe_tokens_and_only_a_subscription_may_end_in_a_wildcard() -> None:
    tenant, device = "3f2b5c1e-8d4a-4a63-9d55-1f0c2b7d9e10", "ab" * 32
    assert subjects.device(tenant, device) == f"device.{tenant}.{device}"
    assert subjects.device_of(subjects.device(tenant, device)) == (tenant, device)
    assert subjects.telemetry(tenant) == f"telemetry.{tenant}"
    assert check_subject("telemetry.t1.*", wildcard=True)
    for subject in ("telemetry.t1.*", "a..b", "*.a", "a.>", ""):
        with pytest.raises(ValueError, match="not a safe subject token"):
            check_subject(subject)
    with pytest.raises(TypeError):
        check_subject(b"device.t1.d1")  # type: ignore[arg-type]


def test_the_bus_url_reaches_worker_processes_through_the_environment_and_empty_means_in_process() -> None:
    settings = Settings(bus_url="nats://127.0.0.1:4222")
    environment = settings.to_environment()
    assert environment["FLEETWARD_BUS_URL"] == "nats://127.0.0.1:4222"
    assert Settings.from_environment(environment).bus_url == "nats://127.0.0.1:4222"
    assert "FLEETWARD_BUS_URL" not in Settings().to_environment()
    assert Settings.from_environment({"FLEETWARD_BUS_URL": ""}).bus_url is None
    assert Settings.from_environment(environment, bus_url="").bus_url is None
    assert isinstance(bus_for(None), LocalBus)
    assert isinstance(bus_for("nats://127.0.0.1:4222"), NatsBus)
