"""The agent's hub link against the real hub (real TLS, real store): telemetry that survives an unreachable
hub, a restart and a network cut; backoff; method, desired-property and cloud-to-device routing; the twin;
a renewed certificate; quarantine.

Network trouble is made by :class:`Proxy`, a TCP relay between the agent and the hub that the test can
refuse connections with, cut, or make hold back what the hub sends (so that PUBACKs are lost). The hub runs
on SQLite only here: the store behind it is not what these tests are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import RootModel

from fleetward.agent.backoff import full_jitter
from fleetward.agent.dialect import CloudMessage, MethodCall
from fleetward.agent.link import (
    CertificateFiles,
    DesiredProperties,
    HubLink,
    LinkSettings,
    LinkStatus,
    MethodResult,
)
from fleetward.agent.outbox import Outbox, OutboxLimits
from fleetward.api import schemas
from fleetward.errors import InvalidInput, PayloadTooLarge, TransportError
from fleetward.server import free_port
from fleetward.sim.fleet import SimulatedDevice
from tests.conftest import HubSetup, healthy_software

T = TypeVar("T")
JsonPatch = RootModel[dict[str, Any]]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleetward.db'}"


@pytest.fixture
def device(hub: HubSetup) -> SimulatedDevice:
    return hub.enroll(SimulatedDevice("panel-1", healthy_software()))


# ---------------------------------------------------------------------- helpers


class Proxy:
    """A TCP relay to the hub that a test can stop (refuse), cut (drop every connection) or hold (keep
    what the hub sends from reaching the agent)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def cut(self) -> None:
        """Drop every connection at once, without a word to either side."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, upstream_writer}
        for source, sink, downstream in ((reader, upstream_writer, False), (upstream_reader, writer, True)):
            task = asyncio.create_task(self._pipe(source, sink, downstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, downstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if downstream:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def proxy_to(hub: HubSetup, *, started: bool = True) -> AsyncIterator[Proxy]:
    proxy = Proxy(hub.hub_port)
    if started:
        await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def credentials(hub: HubSetup, device: SimulatedDevice, directory: Path) -> CertificateFiles:
    """The device's current certificate and key, written where the agent keeps them."""
    assert device.credential is not None
    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(hub.tls.ca_file, directory / "device.pem", directory / "device.key")
    files.certificate_file.write_text(device.credential.issued.certificate)
    descriptor = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(device.credential.key_pem())
    return files


def link_settings(device: SimulatedDevice, port: int, **overrides: Any) -> LinkSettings:
    options: dict[str, Any] = {
        "backoff_initial_seconds": 0.05,
        "backoff_max_seconds": 0.4,
        "request_timeout_seconds": 5.0,
        "connect_timeout_seconds": 5.0,
        **overrides,
    }
    return LinkSettings(device_id=device.device_id, host="127.0.0.1", port=port, **options)


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'the condition'} did not hold within {timeout} s ({result!r})")
        await asyncio.sleep(0.05)


def device_path(hub: HubSetup, device: SimulatedDevice, rest: str = "") -> str:
    return f"/v1/tenants/{hub.tenant.id}/devices/{device.device_id}{rest}"


async def stored(hub: HubSetup, device: SimulatedDevice) -> list[schemas.TelemetryPublic]:
    """The device's telemetry as the hub committed it, oldest first."""
    params: dict[str, str | int] = {"device_id": device.device_id, "limit": 1000}
    return await asyncio.to_thread(
        hub.tenant.client.get_list, f"/v1/tenants/{hub.tenant.id}/telemetry", schemas.TelemetryPublic, params
    )


async def stored_count(hub: HubSetup, device: SimulatedDevice, count: int) -> list[schemas.TelemetryPublic]:
    async def enough() -> list[schemas.TelemetryPublic]:
        rows = await stored(hub, device)
        return rows if len(rows) >= count else []

    return await eventually(enough, what=f"{count} messages stored")


def first_appearances(rows: list[schemas.TelemetryPublic]) -> list[str]:
    """Message ids in the order the hub first stored them (a duplicate is the same id again)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row.properties["$.mid"], None)
    return list(seen)


async def invoke(
    hub: HubSetup, device: SimulatedDevice, name: str, payload: Any = None
) -> schemas.MethodResultPublic:
    return await asyncio.to_thread(
        hub.tenant.client.post,
        device_path(hub, device, f"/methods/{name}"),
        schemas.MethodInvoke(payload=payload, timeout_seconds=5),
        schemas.MethodResultPublic,
    )


async def send_message(
    hub: HubSetup, device: SimulatedDevice, body: str, **properties: str
) -> schemas.CloudToDevicePublic:
    return await asyncio.to_thread(
        hub.tenant.client.post,
        device_path(hub, device, "/messages"),
        schemas.CloudToDeviceCreate(body=body, properties=properties),
        schemas.CloudToDevicePublic,
    )


async def message_states(hub: HubSetup, device: SimulatedDevice) -> dict[str, str]:
    listed = await asyncio.to_thread(
        hub.tenant.client.get_list, device_path(hub, device, "/messages"), schemas.CloudToDevicePublic
    )
    return {message.id: message.state for message in listed}


async def patch_desired(
    hub: HubSetup, device: SimulatedDevice, patch: dict[str, Any]
) -> schemas.DesiredPatched:
    return await asyncio.to_thread(
        hub.tenant.client.patch,
        device_path(hub, device, "/twin/desired"),
        JsonPatch(patch),
        schemas.DesiredPatched,
    )


async def hub_sees(hub: HubSetup, device: SimulatedDevice, connected: bool) -> None:
    async def check() -> bool:
        answer = await asyncio.to_thread(
            hub.tenant.client.get, device_path(hub, device, "/connection"), schemas.ConnectionPublic
        )
        return answer.connected is connected

    await eventually(check, what=f"the hub seeing the device {'on' if connected else 'off'}line")


class Recorder:
    """A sleep that records the delays asked for and sleeps only ``actual`` seconds."""

    def __init__(self, actual: float = 0.0) -> None:
        self.delays: list[float] = []
        self._actual = actual

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(self._actual)


# ---------------------------------------------------------------------- telemetry that loses nothing


async def test_telemetry_put_while_the_hub_is_unreachable_is_delivered_in_order_once_it_is(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    async with (
        proxy_to(hub, started=False) as proxy,
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, proxy.port), outbox, files) as link,
    ):
        ids = [await outbox.put(f"reading {number}".encode(), {"n": str(number)}) for number in range(50)]

        async def failed_twice() -> bool:
            return link.status.failures >= 2

        await eventually(failed_twice, what="two failed attempts")
        assert not link.status.connected
        assert (await outbox.stats()).messages == 50

        async def first_connected() -> LinkStatus:
            async with contextlib.aclosing(link.changes()) as changes:
                async for status in changes:
                    if status.connected:
                        return status
            raise AssertionError("the changes ended")

        watcher = asyncio.create_task(first_connected())
        await proxy.start()
        status = await asyncio.wait_for(watcher, 10)
        assert status.connects == 1
        assert status.failures >= 2
        await link.flush(timeout=20)
    rows = await stored(hub, device)
    assert [row.body for row in rows] == [f"reading {number}" for number in range(50)]
    assert [row.properties["$.mid"] for row in rows] == ids
    assert [row.properties["n"] for row in rows] == [str(number) for number in range(50)]


async def test_a_restart_with_unacknowledged_messages_loses_nothing_and_duplicates_carry_the_same_id(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    """The hub commits ten messages whose PUBACKs never arrive; the agent restarts and sends them again."""
    state = tmp_path / "agent"
    files = credentials(hub, device, state)
    async with proxy_to(hub) as proxy:
        async with (
            Outbox.open(state) as outbox,
            HubLink(link_settings(device, proxy.port), outbox, files) as link,
        ):
            await link.wait_connected(timeout=10)
            proxy.hold()  # nothing the hub sends gets through: no PUBACK
            ids = [await outbox.put(f"m{number}".encode()) for number in range(10)]
            await stored_count(hub, device, 10)
            assert link.status.acknowledged == 0
        proxy.release()

    async with Outbox.open(state) as outbox:
        assert (await outbox.stats()).messages == 10
        async with HubLink(link_settings(device, hub.hub_port), outbox, files) as link:
            await link.flush(timeout=20)
        assert (await outbox.stats()).messages == 0
    rows = await stored(hub, device)
    assert len(rows) == 20
    assert first_appearances(rows) == ids
    for message_id in ids:
        copies = [row for row in rows if row.properties["$.mid"] == message_id]
        assert len(copies) == 2
        assert copies[0].body == copies[1].body


async def test_a_network_cut_mid_stream_loses_nothing_and_keeps_the_order(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    count = 240
    async with (
        proxy_to(hub) as proxy,
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, proxy.port, inflight_window=16), outbox, files) as link,
    ):
        ids: list[str] = []

        async def produce() -> None:
            for number in range(count):
                ids.append(await outbox.put(f"m{number}".encode()))
                await asyncio.sleep(0.003)

        producer = asyncio.create_task(produce())
        await stored_count(hub, device, 60)
        proxy.hold()  # what the hub acknowledges from here on is lost with the connection
        await asyncio.sleep(0.2)
        proxy.cut()
        proxy.release()
        await producer
        await link.flush(timeout=30)
        assert link.status.connects >= 2
    rows = await stored(hub, device)
    assert first_appearances(rows) == ids
    assert len(rows) > count  # what the hub acknowledged during the hold came again, under the same id
    by_id: dict[str, set[str | None]] = {}
    for row in rows:
        by_id.setdefault(row.properties["$.mid"], set()).add(row.body)
    assert all(len(bodies) == 1 for bodies in by_id.values())


async def test_when_the_outbox_is_full_the_oldest_are_dropped_and_the_hub_is_told_how_many(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    async with (
        proxy_to(hub, started=False) as proxy,
        Outbox.open(tmp_path / "agent", OutboxLimits(max_messages=20)) as outbox,
        HubLink(link_settings(device, proxy.port), outbox, files) as link,
    ):
        await outbox.put(b"tamper alarm", critical=True)
        for number in range(30):
            await outbox.put(f"m{number}".encode())
        assert (await outbox.stats()).dropped == 11
        await proxy.start()
        await link.flush(timeout=20)
    rows = await stored(hub, device)
    assert [row.body for row in rows] == ["tamper alarm"] + [f"m{number}" for number in range(11, 30)]
    assert rows[-1].properties["fleetward.dropped"] == "11"
    assert "fleetward.dropped" not in rows[0].properties


# ---------------------------------------------------------------------- reconnecting


def test_backoff_doubles_from_its_initial_delay_to_its_cap_with_full_jitter() -> None:
    def upper(low: float, high: float) -> float:
        return high

    assert [full_jitter(attempt, 1.0, 30.0, upper) for attempt in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert full_jitter(10_000, 1.0, 30.0, upper) == 30
    draws = [full_jitter(attempt, 1.0, 30.0, random.Random(attempt).uniform) for attempt in range(200)]  # noqa: S311
    assert all(0 <= draw <= min(30.0, 2.0**attempt) for attempt, draw in enumerate(draws))
    assert len(set(draws)) == len(draws)


async def test_reconnecting_backs_off_exponentially_to_its_cap_and_starts_again_after_a_stable_connection(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    sleep = Recorder(actual=0.01)

    def upper(low: float, high: float) -> float:
        return high

    async with proxy_to(hub, started=False) as proxy, Outbox.open(tmp_path / "agent") as outbox:
        settings = link_settings(
            device, proxy.port, backoff_initial_seconds=0.1, backoff_max_seconds=1.0, stable_after_seconds=0.3
        )
        async with HubLink(settings, outbox, files, sleep=sleep, uniform=upper) as link:

            async def attempts(count: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return len(sleep.delays) >= count

                return check

            await eventually(await attempts(7), what="seven attempts")
            assert sleep.delays[:7] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]

            await proxy.start()
            await link.wait_connected(timeout=10)
            await asyncio.sleep(0.5)  # longer than stable_after_seconds
            before = len(sleep.delays)
            await proxy.stop()
            await eventually(await attempts(before + 3), what="three more attempts")
            assert sleep.delays[before : before + 3] == [0.1, 0.2, 0.4]
            assert link.status.connects == 1


async def test_the_delays_are_drawn_at_random_below_the_ceiling(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    sleep = Recorder()
    settings = link_settings(device, free_port(), backoff_initial_seconds=0.1, backoff_max_seconds=1.0)
    async with (
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(settings, outbox, files, sleep=sleep, uniform=random.Random(4).uniform),  # noqa: S311
    ):

        async def enough() -> bool:
            return len(sleep.delays) >= 12

        await eventually(enough)
    ceilings = [min(1.0, 0.1 * 2**attempt) for attempt in range(12)]
    assert all(0 <= delay <= ceiling for delay, ceiling in zip(sleep.delays, ceilings, strict=False))
    assert sleep.delays[:12] != ceilings


async def test_a_renewed_certificate_is_used_on_the_next_connection(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    """After renewal the agent reconnects with the new files; revoking the old certificate then ends
    nothing (the hub ends only sessions on a revoked certificate)."""
    assert device.credential is not None
    old_serial = device.credential.issued.serial
    files = credentials(hub, device, tmp_path / "agent")
    async with (
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, hub.hub_port), outbox, files) as link,
    ):
        await link.wait_connected(timeout=10)
        await asyncio.to_thread(hub.enroll, device, claim=False)
        assert device.credential.issued.serial != old_serial
        credentials(hub, device, tmp_path / "agent")
        link.reconnect()

        async def reconnected() -> bool:
            return link.status.connects == 2 and link.status.connected

        await eventually(reconnected, what="the second connection")
        await asyncio.to_thread(
            hub.tenant.client.post,
            f"/v1/tenants/{hub.tenant.id}/certificates/{old_serial}/revoke",
            schemas.Revoke(),
            schemas.CertificatePublic,
        )
        await asyncio.sleep(1.5)  # the hub ends a revoked certificate's session within a second
        await outbox.put(b"on the renewed certificate")
        await link.flush(timeout=10)
        assert (link.status.connects, link.status.connected) == (2, True)
    assert [row.body for row in await stored(hub, device)] == ["on the renewed certificate"]


# ---------------------------------------------------------------------- what comes down the link


async def test_direct_methods_reach_their_handler_and_one_nobody_handles_is_answered_404(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    calls: list[MethodCall] = []

    async def reboot(call: MethodCall) -> MethodResult:
        calls.append(call)
        return MethodResult.of_json(200, {"rebooting_in": call.json()})

    async def explode(call: MethodCall) -> MethodResult:
        raise RuntimeError("boom")

    files = credentials(hub, device, tmp_path / "agent")
    async with (
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, hub.hub_port), outbox, files) as link,
    ):
        link.on_method("reboot", reboot)
        link.on_method("explode", explode)
        await link.wait_connected(timeout=10)
        answered = await invoke(hub, device, "reboot", {"seconds": 5})
        assert (answered.status, answered.payload) == (200, {"rebooting_in": {"seconds": 5}})
        unhandled = await invoke(hub, device, "self_destruct")
        assert unhandled.status == 404
        assert "self_destruct" in unhandled.payload["message"]
        failed = await invoke(hub, device, "explode")
        assert failed.status == 500
        link.on_method("reboot", None)
        assert (await invoke(hub, device, "reboot")).status == 404
    assert [(call.name, call.json()) for call in calls] == [("reboot", {"seconds": 5})]


async def test_desired_properties_reach_the_handler_whole_after_each_connect_and_as_patches_between(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    seen: list[DesiredProperties] = []

    async def desired(update: DesiredProperties) -> None:
        seen.append(update)

    async def seen_version(version: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return any(update.version == version for update in seen)

        return check

    files = credentials(hub, device, tmp_path / "agent")
    async with (
        proxy_to(hub) as proxy,
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, proxy.port), outbox, files) as link,
    ):
        link.on_desired(desired)
        await eventually(await seen_version(1), what="the whole document at connect")
        patched = await patch_desired(hub, device, {"threshold": 30, "fan": {"speed": 2}})
        assert patched.pushed
        await eventually(await seen_version(2), what="the patch")
        await proxy.stop()
        await hub_sees(hub, device, connected=False)
        patched = await patch_desired(hub, device, {"fan": {"speed": None}, "mode": "eco"})
        assert not patched.pushed
        await proxy.start()
        await eventually(await seen_version(3), what="the whole document after reconnecting")
    assert seen == [
        DesiredProperties(1, {}, complete=True),
        DesiredProperties(2, {"threshold": 30, "fan": {"speed": 2}}, complete=False),
        DesiredProperties(3, {"threshold": 30, "fan": {}, "mode": "eco"}, complete=True),
    ]


async def test_cloud_to_device_messages_wait_for_a_handler_then_reach_it_and_are_completed(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    received: list[CloudMessage] = []

    async def handle(message: CloudMessage) -> None:
        received.append(message)

    early = await send_message(hub, device, "open valve 3", kind="command")
    files = credentials(hub, device, tmp_path / "agent")
    async with (
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, hub.hub_port), outbox, files) as link,
    ):
        await link.wait_connected(timeout=10)
        await asyncio.sleep(0.3)
        assert received == []  # no handler yet: the message waits on the hub
        assert (await message_states(hub, device))[early.id] == "pending"
        link.on_message(handle)

        async def got(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(received) >= count

            return check

        await eventually(await got(1), what="the queued message")
        late = await send_message(hub, device, "close valve 3")
        await eventually(await got(2), what="the live message")

        async def completed() -> bool:
            states = await message_states(hub, device)
            return states[early.id] == states[late.id] == "completed"

        await eventually(completed, what="both messages completed")
    assert [(message.message_id, message.body) for message in received] == [
        (early.id, b"open valve 3"),
        (late.id, b"close valve 3"),
    ]
    assert received[0].property("kind") == "command"


async def test_the_twin_is_read_and_reported_with_timeouts_and_refusals_raise(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    async with (
        Outbox.open(tmp_path / "agent") as outbox,
        HubLink(link_settings(device, hub.hub_port), outbox, files) as link,
    ):
        assert await link.patch_reported({"temperature": 21.5, "fan": {"speed": 3}}) == 2
        assert await link.patch_reported({"fan": None}) == 3
        twin = await link.get_twin()
        assert (twin.reported, twin.reported_version) == ({"temperature": 21.5}, 3)
        assert (twin.desired, twin.desired_version) == ({}, 1)
        with pytest.raises(PayloadTooLarge):
            await link.patch_reported({"log": "x" * 40_000})
        with pytest.raises(InvalidInput):
            await link.patch_reported({"a.b": 1})
    settings = link_settings(device, free_port())
    async with Outbox.open(tmp_path / "other") as outbox, HubLink(settings, outbox, files) as link:
        started = time.monotonic()
        with pytest.raises(TransportError) as refused:
            await link.get_twin(timeout=0.3)
        assert refused.value.code == "hub_timeout"
        assert time.monotonic() - started < 2


async def test_a_quarantined_device_keeps_its_telemetry_until_released(
    hub: HubSetup, device: SimulatedDevice, tmp_path: Path
) -> None:
    files = credentials(hub, device, tmp_path / "agent")
    settings = link_settings(device, hub.hub_port, quarantine_retry_seconds=0.2)
    async with Outbox.open(tmp_path / "agent") as outbox, HubLink(settings, outbox, files) as link:
        await link.wait_connected(timeout=10)
        await asyncio.to_thread(
            hub.tenant.client.post,
            device_path(hub, device, "/quarantine"),
            schemas.Quarantine(reason="tamper suspected"),
            schemas.DevicePublic,
        )

        async def quarantined() -> bool:
            return link.status.quarantined

        await eventually(quarantined, what="the link seeing its quarantine")
        await outbox.put(b"while quarantined")
        await asyncio.sleep(0.5)
        assert link.status.connected
        assert (await outbox.stats()).messages == 1
        await asyncio.to_thread(
            hub.tenant.client.post,
            device_path(hub, device, "/release"),
            schemas.Quarantine(),
            schemas.DevicePublic,
        )
        await link.flush(timeout=10)
        assert not link.status.quarantined
    assert [row.body for row in await stored(hub, device)] == ["while quarantined"]
