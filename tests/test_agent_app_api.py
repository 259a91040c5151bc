"""The agent's application API, with real Unix sockets and real application processes that use appkit.

Applications are small Python programs that import ``appkit`` (copied into a directory their user can read,
as the agent does) and are driven by the test through their standard input: each line names an appkit call,
and the program prints what it got. They run with the venv's interpreter as the test's own user, and, to
check who may connect, with ``/usr/bin/python3`` as another user. Protocol abuse (oversized and malformed
frames, floods, a reader that never reads) is played by the test itself on a raw socket. Fakes stand only
behind the injected interfaces: the hub link (:class:`MemoryCloudLink`), telemetry, violations, power.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import pwd
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleetward.appkit
from fleetward.agent import app_protocol as protocol
from fleetward.agent.app_api import AppApiLimits, AppApiServer, AppEndpoint, AppServices
from fleetward.agent.app_cloud import CloudRouter, MemoryCloudLink
from fleetward.agent.app_services import (
    AppCredentialCopies,
    CredentialPaths,
    DeferralLedger,
    MemoryTelemetry,
    MemoryViolations,
    RecordingPowerControls,
    StaticCertificates,
    SystemEvent,
    SystemEventKind,
    SystemEvents,
    Violation,
)
from fleetward.agent.credential import encode_credential
from fleetward.agent.dialect import Json, JsonObject
from fleetward.agent.manifest import Capabilities, PowerControl
from fleetward.agent.peripherals import (
    LinuxPeripheralMap,
    LinuxPeripherals,
    PeripheralUnavailable,
    SimulatedPeripherals,
    spi_message_request,
    spi_transfer_struct,
)
from fleetward.agent.sandbox import AppIdentity, UidRangeIdentities
from fleetward.agent.supervisor import Supervisor, SupervisorConfig
from fleetward.clock import FakeClock
from fleetward.errors import ConfigurationError
from fleetward.wire import twin as twin_rules
from tests.agent_apps import (
    COMPONENT,
    OTHER_COMPONENT,
    SYSTEM_PYTHON,
    AppWorld,
    reachable_directory,
    running_as_root,
)
from tests.test_agent_renewal import self_signed

requires_root = pytest.mark.skipif(not running_as_root(), reason="switching users needs root")
TENANT = "5c1e0f0e-7a52-4d9b-9c1e-5b8f0a3d6e21"
OTHER_TENANT = "0badc0de-7a52-4d9b-9c1e-5b8f0a3d6e21"
EVERYTHING = Capabilities(
    gpio=(8, 12),
    uart=("ISU0",),
    i2c_master=("ISU1",),
    spi_master=("ISU2",),
    adc=("ADC0",),
    pwm=("PWM0",),
    mutable_storage_kb=64,
    device_authentication=TENANT,
    software_update_deferral=True,
    system_event_notifications=True,
    power_controls=(PowerControl.FORCE_REBOOT,),
)
CLOUD_ONLY = Capabilities(device_authentication=TENANT)

DRIVER = r"""
import base64, json, sys, time
from appkit import AgentClient, AgentError


def decode(value):
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value


def encode(value):
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        fields = value.__dataclass_fields__
        return {"type": type(value).__name__, **{name: encode(getattr(value, name)) for name in fields}}
    return value


def slow(payload):
    time.sleep(payload["seconds"])
    return 200, {"slept": payload["seconds"]}


HANDLERS = {
    "echo": lambda payload: (200, {"echo": payload}),
    "plain": lambda payload: {"plain": payload},
    "fail": lambda payload: 1 / 0,
    "slow": slow,
}
client = AgentClient(timeout=20)
try:
    client.connect()
except AgentError as error:
    print(json.dumps({"error": error.code, "message": error.message}), flush=True)
    sys.exit(0)
print(json.dumps({"ok": client.component_id}), flush=True)
received = []
for line in sys.stdin:
    command = json.loads(line)
    name, args = command["call"], [decode(arg) for arg in command["args"]]
    try:
        if name == "on_method":
            result = client.on_method(args[0], HANDLERS[args[1]])
        elif name in ("on_desired", "on_message", "on_event"):
            result = getattr(client, name)(received.append)
        elif name == "run":
            client.run(args[0])
            result, received = received, []
        else:
            result = getattr(client, name)(*args)
        print(json.dumps({"ok": encode(result)}), flush=True)
    except AgentError as error:
        print(json.dumps({"error": error.code, "message": error.message}), flush=True)
"""


# ---------------------------------------------------------------------- the world around one or two servers


@dataclass
class World:
    base: Path
    link: MemoryCloudLink = field(default_factory=MemoryCloudLink)
    telemetry: MemoryTelemetry = field(default_factory=MemoryTelemetry)
    violations: MemoryViolations = field(default_factory=MemoryViolations)
    peripherals: SimulatedPeripherals = field(default_factory=SimulatedPeripherals)
    power: RecordingPowerControls = field(default_factory=RecordingPowerControls)
    events: SystemEvents = field(default_factory=SystemEvents)
    clock: FakeClock = field(default_factory=FakeClock)
    router: CloudRouter = field(init=False)
    deferrals: DeferralLedger = field(init=False)
    storage_used: int = 4096

    def __post_init__(self) -> None:
        self.router = CloudRouter(self.link, reserved_methods=frozenset({"fleetward.agent"}))
        self.deferrals = DeferralLedger(max_total_seconds=3600, clock=self.clock)
        (self.base / "lib").mkdir(mode=0o755)
        shutil.copy(Path(fleetward.appkit.__file__), self.base / "lib" / "appkit.py")
        (self.base / "lib" / "appkit.py").chmod(0o644)
        (self.base / "lib" / "driver.py").write_text(DRIVER)
        (self.base / "lib" / "driver.py").chmod(0o644)

    async def storage(self, component_id: str) -> int:
        return self.storage_used

    def services(self, tenant_id: str | None = TENANT) -> AppServices:
        return AppServices(
            on_violation=self.violations,
            tenant_id=tenant_id,
            telemetry=self.telemetry,
            cloud=self.router,
            peripherals=self.peripherals,
            storage=self.storage,
            deferrals=self.deferrals,
            certificates=StaticCertificates(
                CredentialPaths(
                    Path("/run/fleetward/c/certificate.pem"), Path("/run/fleetward/c/key.pem"), "d" * 64
                )
            ),
            power=self.power,
            events=self.events,
        )

    def socket_path(self, component_id: str) -> Path:
        return self.base / "sockets" / f"{component_id}.sock"

    @asynccontextmanager
    async def serve(
        self,
        capabilities: Capabilities,
        *,
        component_id: str = COMPONENT,
        identity: AppIdentity | None = None,
        limits: AppApiLimits | None = None,
        services: AppServices | None = None,
    ) -> AsyncIterator[AppApiServer]:
        endpoint = AppEndpoint(component_id, capabilities, self.socket_path(component_id), identity)
        async with AppApiServer(endpoint, services or self.services(), limits) as server:
            yield server


@pytest.fixture
def world() -> Iterator[World]:
    with reachable_directory() as base:
        yield World(base)


class App:
    """An application process that uses appkit, driven line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, world: World, component_id: str = COMPONENT, *, user: int | None = None) -> App:
        environment = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(world.base / "lib"),
            "FLEETWARD_AGENT_SOCKET": str(world.socket_path(component_id)),
        }
        interpreter = str(SYSTEM_PYTHON) if user is not None else sys.executable
        process = await asyncio.create_subprocess_exec(
            interpreter,
            str(world.base / "lib" / "driver.py"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=environment,
            cwd=world.base,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
        return cls(process)

    async def line(self, timeout: float = 20.0) -> dict[str, object]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            text = await self.process.stdout.readline()
        assert text, "the application ended"
        answer: dict[str, object] = json.loads(text)
        return answer

    def send(self, call: str, *args: object) -> None:
        assert self.process.stdin is not None
        encoded = [
            {"$bytes": base64.b64encode(arg).decode()} if isinstance(arg, bytes) else arg for arg in args
        ]
        self.process.stdin.write(json.dumps({"call": call, "args": encoded}).encode() + b"\n")

    async def do(self, call: str, *args: object) -> dict[str, object]:
        self.send(call, *args)
        return await self.line()

    async def ok(self, call: str, *args: object) -> object:
        answer = await self.do(call, *args)
        assert "ok" in answer, f"{call}: {answer}"
        return answer["ok"]

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@asynccontextmanager
async def app(world: World, component_id: str = COMPONENT, *, user: int | None = None) -> AsyncIterator[App]:
    running = await App.start(world, component_id, user=user)
    try:
        hello = await running.line()
        assert hello == {"ok": component_id}, hello
        yield running
    finally:
        await running.stop()


async def wait_until(condition: Callable[[], bool], timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        await asyncio.sleep(0.01)


class RawClient:
    """The test's own connection, for what no well-behaved application sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path, *, hello: bool = True) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=2 * 1024 * 1024)
        client = cls(reader, writer)
        if hello:
            assert (await client.frame())["push"] == "hello"
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, request_id: int, op: str, **args: object) -> None:
        await self.send(json.dumps({"id": request_id, "op": op, "args": args}).encode() + b"\n")

    async def frame(self, timeout: float = 10.0) -> dict[str, object]:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        assert line, "the agent closed the connection"
        answer: dict[str, object] = json.loads(line)
        return answer

    async def closed(self, timeout: float = 10.0) -> bool:
        """Read until the agent ends the connection; True if it did within ``timeout``. Closes ours too."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        finally:
            self.writer.close()
        return True

    def close(self) -> None:
        self.writer.close()


def error_code(answer: dict[str, object]) -> object:
    error = answer.get("error")
    return error.get("code") if isinstance(error, dict) else error


# ---------------------------------------------------------------------- every operation, declared or not


@dataclass(frozen=True)
class Operation:
    op: str
    call: str
    args: tuple[object, ...]
    capability: str
    detail: str | int | None


OPERATIONS = (
    Operation("telemetry.send", "send_telemetry", ("hello",), "DeviceAuthentication", TENANT),
    Operation("twin.get", "get_twin", (), "DeviceAuthentication", TENANT),
    Operation("twin.report", "report", ({"temperature": 21},), "DeviceAuthentication", TENANT),
    Operation("twin.subscribe", "subscribe_desired", (), "DeviceAuthentication", TENANT),
    Operation("methods.register", "register_method", ("blink",), "DeviceAuthentication", TENANT),
    Operation("messages.subscribe", "subscribe_messages", (), "DeviceAuthentication", TENANT),
    Operation("device.certificate_paths", "certificate_paths", (), "DeviceAuthentication", TENANT),
    Operation("events.subscribe", "subscribe_events", (), "SystemEventNotifications", None),
    Operation("gpio.write", "gpio_write", (8, 1), "Gpio", 8),
    Operation("gpio.read", "gpio_read", (8,), "Gpio", 8),
    Operation("uart.open", "uart_open", ("ISU0",), "Uart", "ISU0"),
    Operation("uart.write", "uart_write", ("ISU0", b"ping"), "Uart", "ISU0"),
    Operation("uart.read", "uart_read", ("ISU0", 16, 1.0), "Uart", "ISU0"),
    Operation("uart.close", "uart_close", ("ISU0",), "Uart", "ISU0"),
    Operation("i2c.transfer", "i2c_transfer", ("ISU1", 0x48, b"\x00", 2), "I2cMaster", "ISU1"),
    Operation("spi.transfer", "spi_transfer", ("ISU2", 0, b"\x9f", 3), "SpiMaster", "ISU2"),
    Operation("adc.read", "adc_read", ("ADC0", 1), "Adc", "ADC0"),
    Operation("pwm.set", "pwm_set", ("PWM0", 0, 1_000_000, 250_000), "Pwm", "PWM0"),
    Operation("storage.quota", "storage_quota", (), "MutableStorage", None),
    Operation("update.defer", "defer_update", (600,), "SoftwareUpdateDeferral", None),
    Operation("power.reboot", "reboot", (), "PowerControls", "ForceReboot"),
)


async def test_every_operation_is_allowed_when_declared_and_nothing_is_recorded(world: World) -> None:
    assert {operation.op for operation in OPERATIONS} | {"methods.respond"} == set(protocol.OPERATIONS)
    world.peripherals.add_i2c_device("ISU1", 0x48, {0x00: b"\x12\x34"})
    world.peripherals.script_spi("ISU2", 0, b"\xef\x40\x18")
    world.peripherals.script_adc("ADC0", 1, 1234)
    async with world.serve(EVERYTHING), app(world) as running:
        results = {
            operation.call: await running.ok(operation.call, *operation.args) for operation in OPERATIONS
        }
    assert results["gpio_read"] == 1
    assert results["uart_write"] == 4
    assert results["uart_read"] == {"$bytes": base64.b64encode(b"ping").decode()}
    assert results["i2c_transfer"] == {"$bytes": base64.b64encode(b"\x12\x34").decode()}
    assert results["spi_transfer"] == {"$bytes": base64.b64encode(b"\xef\x40\x18").decode()}
    assert results["adc_read"] == 1234
    assert results["storage_quota"] == [4096, 64 * 1024]
    assert results["certificate_paths"] == ["/run/fleetward/c/certificate.pem", "/run/fleetward/c/key.pem"]
    assert results["defer_update"] == {
        "granted_seconds": 600,
        "remaining_seconds": 3000,
        "deferred_until": "2026-01-01T00:10:00+00:00",
    }
    assert results["report"] == 2
    assert world.link.reported == {"apps": {COMPONENT: {"temperature": 21}}}
    assert [message.body for message in world.telemetry.messages] == [b"hello"]
    assert world.telemetry.messages[0].properties == (("fleetward-component", COMPONENT),)
    assert world.telemetry.messages[0].critical is False
    assert world.power.reboots == [COMPONENT]
    assert world.peripherals.pwm_setting("PWM0", 0) is not None
    assert world.violations.violations == []


async def test_every_operation_is_refused_when_not_declared_and_each_refusal_is_recorded(
    world: World,
) -> None:
    limits = AppApiLimits(max_violations_per_minute=100)
    async with world.serve(Capabilities(), limits=limits) as server, app(world) as running:
        for operation in OPERATIONS:
            answer = await running.do(operation.call, *operation.args)
            assert answer["error"] == "capability_not_declared", (operation, answer)
            message = str(answer["message"])
            assert message.startswith(f"{operation.op}: the manifest does not declare {operation.capability}")
        assert server.stats.violations == len(OPERATIONS)
    assert world.violations.violations == [
        Violation(COMPONENT, operation.capability, operation.detail) for operation in OPERATIONS
    ]
    assert world.telemetry.messages == []
    assert world.link.reported_patches == []
    assert world.peripherals.writes == []
    assert world.power.reboots == []
    assert not world.deferrals.grants


async def test_a_refusal_names_the_operation_the_capability_and_the_detail_not_declared(world: World) -> None:
    narrow = Capabilities(
        gpio=(8,), device_authentication=OTHER_TENANT, power_controls=(PowerControl.FORCE_POWER_DOWN,)
    )
    async with world.serve(narrow), app(world) as running:
        pin = await running.do("gpio_read", 9)
        telemetry = await running.do("send_telemetry", "hello")
        reboot = await running.do("reboot")
        assert await running.ok("gpio_read", 8) == 0
    assert pin["error"] == "capability_not_declared"
    assert pin["message"] == "gpio.read: the manifest does not declare Gpio 9"
    assert telemetry["message"] == (
        f"telemetry.send: the manifest does not declare DeviceAuthentication for tenant '{TENANT}'"
    )
    assert reboot["message"] == "power.reboot: the manifest does not declare PowerControls 'ForceReboot'"
    assert world.violations.violations == [
        Violation(COMPONENT, "Gpio", 9),
        Violation(COMPONENT, "DeviceAuthentication", TENANT),
        Violation(COMPONENT, "PowerControls", "ForceReboot"),
    ]


async def test_violations_beyond_the_rate_are_counted_but_not_recorded(world: World) -> None:
    limits = AppApiLimits(max_violations_per_minute=3)
    async with world.serve(Capabilities(), limits=limits) as server:
        client = await RawClient.connect(world.socket_path(COMPONENT))
        for request_id in range(5):
            await client.request(request_id, "gpio.read", pin=request_id)
            assert error_code(await client.frame()) == "capability_not_declared"
        client.close()
        assert server.stats.violations == 5
        assert server.stats.violations_not_recorded == 2
    assert [violation.detail for violation in world.violations.violations] == [0, 1, 2]


async def test_cloud_operations_wait_for_enrollment_even_when_declared(world: World) -> None:
    async with world.serve(CLOUD_ONLY, services=world.services(tenant_id=None)), app(world) as running:
        answer = await running.do("send_telemetry", "hello")
    assert answer["error"] == "device_not_enrolled"
    assert world.violations.violations == []


async def test_a_declared_service_the_runtime_did_not_wire_is_unavailable(world: World) -> None:
    services = AppServices(on_violation=world.violations, tenant_id=TENANT)
    async with world.serve(EVERYTHING, services=services), app(world) as running:
        answers = [
            await running.do(call, *args) for call, *args in (("gpio_read", 8), ("send_telemetry", "x"))
        ]
    assert [answer["error"] for answer in answers] == ["service_unavailable", "service_unavailable"]


async def test_telemetry_properties_of_the_agent_are_refused(world: World) -> None:
    async with world.serve(CLOUD_ONLY), app(world) as running:
        forged = await running.do("send_telemetry", "{}", {"fleetward-report": "crash"})
        other = await running.do("send_telemetry", "{}", {"Fleetward-Component": OTHER_COMPONENT})
        system = await running.do("send_telemetry", "{}", {"$.mid": "mine"})
        fine = await running.do("send_telemetry", {"t": 1}, {"alert": "1"})
        binary = await running.do("send_telemetry", b"\x00\xff")
    assert [error_code(answer) for answer in (forged, other, system)] == ["reserved_property"] * 3
    assert "ok" in fine
    assert "ok" in binary
    sent = world.telemetry.messages
    assert sent[0].body == b'{"t":1}'
    assert dict(sent[0].properties) == {
        "alert": "1",
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "fleetward-component": COMPONENT,
    }
    assert sent[1].body == b"\x00\xff"


# ---------------------------------------------------------------------- the twin, methods, messages, events


def nested(levels: int) -> dict[str, object]:
    """An object ``levels`` deep counting itself: {"n": {"n": … {"v": 1}}}."""
    value: dict[str, object] = {"v": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


async def test_each_application_reads_and_reports_only_its_own_twin_namespace(world: World) -> None:
    world.link.desired = {
        "apps": {COMPONENT: {"interval": 10}, OTHER_COMPONENT: {"interval": 99}},
        "agent": 1,
    }
    world.link.reported = {"agent": {"version": "1.0"}}
    async with (
        world.serve(CLOUD_ONLY),
        world.serve(CLOUD_ONLY, component_id=OTHER_COMPONENT),
        app(world) as first,
        app(world, OTHER_COMPONENT) as second,
    ):
        await first.ok("report", {"temperature": 21, "apps": {OTHER_COMPONENT: {"temperature": -1}}})
        await second.ok("report", {"temperature": 30})
        await first.ok("report", {"temperature": None, "humidity": 40})
        twin = await first.ok("get_twin")
        bad_key = await second.do("report", {"a.b": 1})
        dollar = await second.do("report", {"$version": 7})
        deep_enough = await second.do("report", {"deep": nested(7)})
        too_deep = await second.do("report", {"deep": nested(8)})
    assert twin == {
        "desired": {"interval": 10},
        "desired_version": 1,
        "reported": {"humidity": 40, "apps": {OTHER_COMPONENT: {"temperature": -1}}},
        "reported_version": 4,
    }
    assert world.link.reported == {
        "agent": {"version": "1.0"},
        "apps": {
            COMPONENT: {"humidity": 40, "apps": {OTHER_COMPONENT: {"temperature": -1}}},
            OTHER_COMPONENT: {"temperature": 30, "deep": nested(7)},
        },
    }
    assert "ok" in deep_enough
    assert "ok" in deep_enough
    assert [error_code(answer) for answer in (bad_key, dollar, too_deep)] == [
        "twin_bad_key",
        "twin_bad_key",
        "twin_too_deep",
    ]


async def test_desired_properties_reach_only_the_application_they_name(world: World) -> None:
    world.link.desired = {"apps": {COMPONENT: {"interval": 10}, OTHER_COMPONENT: {"interval": 99}}}
    await world.link.connected()
    async with (
        world.serve(CLOUD_ONLY),
        world.serve(CLOUD_ONLY, component_id=OTHER_COMPONENT),
        app(world) as first,
        app(world, OTHER_COMPONENT) as second,
    ):
        await first.ok("on_desired")
        await second.ok("on_desired")
        first.send("run", 1.5)
        second.send("run", 1.5)
        await asyncio.sleep(0.3)
        await world.link.set_desired({"apps": {COMPONENT: {"interval": 20, "mode": "eco"}}})
        await world.link.set_desired({"agent": {"log": "debug"}})
        await world.link.set_desired({"apps": {OTHER_COMPONENT: None}})
        first_got, second_got = (await first.line())["ok"], (await second.line())["ok"]
    assert first_got == [
        {"type": "Desired", "version": 1, "complete": True, "properties": {"interval": 10}},
        {"type": "Desired", "version": 2, "complete": False, "properties": {"interval": 20, "mode": "eco"}},
    ]
    assert second_got == [
        {"type": "Desired", "version": 1, "complete": True, "properties": {"interval": 99}},
        {"type": "Desired", "version": 4, "complete": True, "properties": {}},
    ]


async def test_a_method_goes_to_the_application_that_registered_it_and_is_answered(world: World) -> None:
    async with (
        world.serve(CLOUD_ONLY),
        world.serve(CLOUD_ONLY, component_id=OTHER_COMPONENT),
        app(world) as first,
        app(world, OTHER_COMPONENT) as second,
    ):
        await first.ok("on_method", "echo", "echo")
        await first.ok("on_method", "plain", "plain")
        await first.ok("on_method", "fail", "fail")
        taken = await second.do("register_method", "echo")
        reserved = await second.do("register_method", "fleetward.agent")
        first.send("run", 2.0)
        echo = await world.link.call_method("echo", b'{"x": 1}')
        plain = await world.link.call_method("plain", b"[1, 2]")
        fail = await world.link.call_method("fail", b"{}")
        not_json = await world.link.call_method("echo", b"{oops")
        unknown = await world.link.call_method("nobody", b"{}")
        await first.line()
    assert (echo.status, json.loads(echo.payload)) == (200, {"echo": {"x": 1}})
    assert (plain.status, json.loads(plain.payload)) == (200, {"plain": [1, 2]})
    assert fail.status == 500
    assert "ZeroDivisionError" in json.loads(fail.payload)["message"]
    assert not_json.status == 400
    assert unknown.status == 404
    assert error_code(taken) == "method_taken"
    assert error_code(reserved) == "method_taken"
    assert world.router.methods_of(COMPONENT) == ()  # the connection ended: its methods with it
    assert "echo" not in world.link.methods
    assert (await world.link.call_method("echo", b"{}")).status == 404


async def test_a_method_the_application_does_not_answer_in_time_is_a_504(world: World) -> None:
    limits = AppApiLimits(method_timeout_seconds=0.5)
    async with world.serve(CLOUD_ONLY, limits=limits), app(world) as running:
        await running.ok("on_method", "slow", "slow")
        running.send("run", 3.0)
        late = await world.link.call_method("slow", b'{"seconds": 1.5}')
        await asyncio.sleep(1.2)  # the application answers late, is told so, and goes on
        quick = await world.link.call_method("slow", b'{"seconds": 0}')
        await running.line()
    assert late.status == 504
    assert quick.status == 200


async def test_cloud_to_device_messages_go_to_the_component_they_name(world: World) -> None:
    async with world.serve(CLOUD_ONLY), app(world) as running:
        assert not world.link.subscribed_to_messages  # messages wait on the hub until an app subscribes
        await running.ok("on_message")
        running.send("run", 1.0)
        assert await world.link.send_message(b"on", {"fleetward-component": COMPONENT, "k": "v"})
        assert await world.link.send_message(b"\xff\x00", {"fleetward-component": COMPONENT})
        assert await world.link.send_message(b"lost", {"fleetward-component": OTHER_COMPONENT})
        assert await world.link.send_message(b"lost", {"k": "v"})
        received = (await running.line())["ok"]
    assert received == [
        {
            "type": "Message",
            "message_id": "msg-1",
            "properties": {"$.mid": "msg-1", "fleetward-component": COMPONENT, "k": "v"},
            "body": {"$bytes": base64.b64encode(b"on").decode()},
        },
        {
            "type": "Message",
            "message_id": "msg-2",
            "properties": {"$.mid": "msg-2", "fleetward-component": COMPONENT},
            "body": {"$bytes": base64.b64encode(b"\xff\x00").decode()},
        },
    ]
    assert world.router.stats.messages_dropped == 2


async def test_system_events_reach_the_applications_that_subscribed(world: World) -> None:
    async with world.serve(EVERYTHING), app(world) as running:
        await running.ok("on_event")
        running.send("run", 1.0)
        await wait_until(lambda: world.events.publish(SystemEvent(SystemEventKind.NO_UPDATE_AVAILABLE)) > 0)
        world.events.publish(SystemEvent(SystemEventKind.UPDATE_PENDING, {"max_deferral_seconds": 600}))
        received = (await running.line())["ok"]
    assert isinstance(received, list)
    assert received[-1] == {
        "type": "Event",
        "kind": "update_pending",
        "details": {"max_deferral_seconds": 600},
    }
    assert world.events.publish(SystemEvent(SystemEventKind.REBOOT_PENDING)) == 0  # unsubscribed on close


# ---------------------------------------------------------------------- peripherals, storage, deferral, keys


async def test_simulated_peripherals_answer_through_the_api(world: World) -> None:
    world.peripherals.script_gpio(12, 1, 0)
    world.peripherals.add_i2c_device("ISU1", 0x48, {0x00: b"\x0b\xb8"})
    world.peripherals.script_adc("ADC0", 1, 100, 200)
    async with world.serve(EVERYTHING), app(world) as running:
        scripted = [await running.ok("gpio_read", 12) for _ in range(3)]
        await running.ok("gpio_write", 8, 1)
        level = await running.ok("gpio_read", 8)
        not_open = await running.do("uart_write", "ISU0", b"x")
        await running.ok("uart_open", "ISU0", 9600)
        await running.ok("uart_write", "ISU0", b"echo me")
        world.peripherals.feed_uart("ISU0", b"+ok")
        uart = await running.ok("uart_read", "ISU0", 64, 1.0)
        nothing = await running.ok("uart_read", "ISU0", 64, 0.1)
        bad_baud = await running.do("uart_open", "ISU0", 1234)
        await running.ok("i2c_transfer", "ISU1", 0x48, b"\x10\xca\xfe")
        register = await running.ok("i2c_transfer", "ISU1", 0x48, b"\x00", 2)
        written = await running.ok("i2c_transfer", "ISU1", 0x48, b"\x10", 2)
        nack = await running.do("i2c_transfer", "ISU1", 0x50, b"", 1)
        adc = [await running.ok("adc_read", "ADC0", 1) for _ in range(3)]
        await running.ok("pwm_set", "PWM0", 2, 20_000_000, 1_500_000, False)
        bad_duty = await running.do("pwm_set", "PWM0", 2, 1000, 2000)
    assert scripted == [1, 0, 0]
    assert level == 1
    assert error_code(not_open) == "uart_not_open"
    assert uart == {"$bytes": base64.b64encode(b"echo me+ok").decode()}
    assert nothing == {"$bytes": ""}
    assert error_code(bad_baud) == "uart_baud_rate"
    assert register == {"$bytes": base64.b64encode(b"\x0b\xb8").decode()}
    assert written == {"$bytes": base64.b64encode(b"\xca\xfe").decode()}
    assert error_code(nack) == "peripheral_failed"
    assert adc == [100, 200, 200]
    pwm = world.peripherals.pwm_setting("PWM0", 2)
    assert pwm is not None
    assert (pwm.period_ns, pwm.duty_ns, pwm.enabled) == (20_000_000, 1_500_000, False)
    assert error_code(bad_duty) == "invalid_request"
    assert [(write.kind, write.target, write.value) for write in world.peripherals.writes[:2]] == [
        ("gpio", "8", 1),
        ("uart", "ISU0", b"echo me"),
    ]


async def test_a_uart_is_held_by_one_connection_and_freed_when_it_ends(world: World) -> None:
    async with world.serve(EVERYTHING):
        async with app(world) as first, app(world) as second:
            await first.ok("uart_open", "ISU0")
            busy = await second.do("uart_open", "ISU0")
        async with app(world) as third:
            assert await third.ok("uart_open", "ISU0") is None
    assert error_code(busy) == "peripheral_busy"


async def test_storage_quota_answers_used_and_allowed_bytes(world: World) -> None:
    world.storage_used = 12_288
    async with world.serve(Capabilities(mutable_storage_kb=8)), app(world) as running:
        assert await running.ok("storage_quota") == [12_288, 8192]


async def test_update_deferrals_are_bounded_per_request_and_in_total(world: World) -> None:
    limits = AppApiLimits(max_deferral_request_seconds=1800)
    declared = Capabilities(software_update_deferral=True)
    async with world.serve(declared, limits=limits), app(world) as running:
        over_limit = await running.do("defer_update", 1801)
        over_ceiling = await running.do("defer_update", 86_401)
        zero = await running.do("defer_update", 0)
        first = await running.ok("defer_update", 1800)
        world.clock.advance(1500)
        second = await running.ok("defer_update", 1800)
        world.clock.advance(2100)
        exhausted = await running.do("defer_update", 60)
    assert [error_code(answer) for answer in (over_limit, over_ceiling, zero)] == ["invalid_request"] * 3
    assert first == {
        "granted_seconds": 1800,
        "remaining_seconds": 1800,
        "deferred_until": "2026-01-01T00:30:00+00:00",
    }
    assert second == {
        "granted_seconds": 1800,
        "remaining_seconds": 300,
        "deferred_until": "2026-01-01T00:55:00+00:00",
    }
    assert error_code(exhausted) == "deferral_exhausted"
    assert world.deferrals.deferred_until(COMPONENT) is None  # the clock passed it
    world.deferrals.reset(COMPONENT)
    assert (await world.deferrals.defer(COMPONENT, 60)).granted_seconds == 60


async def test_a_deferral_and_what_is_left_of_its_budget_survive_a_restart_of_the_agent(
    tmp_path: Path,
) -> None:
    clock = FakeClock(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    path = tmp_path / "updates" / "deferrals.json"
    ledger = DeferralLedger(max_total_seconds=3600, clock=clock, path=path)
    await ledger.defer(COMPONENT, 1800)
    clock.advance(1000)
    restarted = DeferralLedger(max_total_seconds=3600, clock=clock, path=path)
    assert restarted.deferred_until(COMPONENT) == dt.datetime(2026, 1, 1, 0, 30, tzinfo=dt.UTC)
    grant = await restarted.defer(COMPONENT, 3600)  # the budget counts from the first deferral, not anew
    assert grant.deferred_until == dt.datetime(2026, 1, 1, 1, 0, tzinfo=dt.UTC)
    assert grant.remaining_seconds == 0
    restarted.reset(COMPONENT)
    assert DeferralLedger(max_total_seconds=3600, clock=clock, path=path).deferred_until(COMPONENT) is None


async def test_certificate_paths_only_with_device_authentication_and_refused_without_a_key(
    world: World,
) -> None:
    unexportable = AppServices(
        on_violation=world.violations, tenant_id=TENANT, certificates=StaticCertificates(None)
    )
    async with world.serve(CLOUD_ONLY, services=unexportable), app(world) as running:
        refused = await running.do("certificate_paths")
    async with world.serve(Capabilities(gpio=(8,))), app(world) as running:
        undeclared = await running.do("certificate_paths")
    assert error_code(refused) == "device_credentials_unavailable"
    assert error_code(undeclared) == "capability_not_declared"
    assert world.violations.violations == [Violation(COMPONENT, "DeviceAuthentication", TENANT)]


def test_credential_copies_are_the_applications_alone_and_follow_a_renewal(world: World) -> None:
    credential_file = world.base / "agent" / "credential.pem"
    credential_file.parent.mkdir(mode=0o700)
    first = self_signed()
    credential_file.write_bytes(encode_credential(first))
    copies = AppCredentialCopies(credential_file, world.base / "app-credentials")
    identity = AppIdentity(uid=201_234, gid=201_234) if running_as_root() else None
    paths = asyncio.run(copies.paths_for(COMPONENT, identity))
    assert paths.key.read_bytes() == first.key_pem()
    assert paths.certificate.read_text().startswith("-----BEGIN CERTIFICATE-----")
    for path in (paths.key, paths.certificate):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o400
        assert info.st_uid == (identity.uid if identity else os.geteuid())
    assert stat.S_IMODE(paths.key.parent.stat().st_mode) == 0o711
    renewed = self_signed()
    credential_file.write_bytes(encode_credential(renewed))
    again = asyncio.run(copies.paths_for(COMPONENT, identity))
    assert (again.certificate, again.key) == (paths.certificate, paths.key)  # the same paths, new content
    assert (paths.device_id, again.device_id) == (first.issued.device_id, renewed.issued.device_id)
    assert paths.key.read_bytes() == renewed.key_pem()
    assert sorted(path.name for path in paths.key.parent.iterdir()) == ["certificate.pem", "key.pem"]


# ---------------------------------------------------------------------- the frames and their bounds


async def test_an_oversized_frame_is_refused_and_the_connection_goes_on(world: World) -> None:
    limits = AppApiLimits(max_frame_bytes=2048)
    async with world.serve(EVERYTHING, limits=limits):
        client = await RawClient.connect(world.socket_path(COMPONENT))
        await client.request(1, "telemetry.send", body="x" * 4096)
        refused = await client.frame()
        await client.request(2, "gpio.read", pin=8)
        after = await client.frame()
        await client.send(b"y" * 100_000)  # no newline yet: refused once, then skipped to the newline
        await client.send(b"y" * 10 + b"\n")
        skipped = await client.frame()
        await client.request(3, "gpio.read", pin=8)
        again = await client.frame()
        client.close()
    assert refused == {
        "id": None,
        "error": {"code": "frame_too_large", "message": "a frame is at most 2048 bytes"},
    }
    assert after == {"id": 2, "result": {"value": 0}}
    assert error_code(skipped) == "frame_too_large"
    assert again == {"id": 3, "result": {"value": 0}}


MALFORMED = [
    pytest.param(b"{not json", None, "invalid_request", id="not-json"),
    pytest.param(b"[1, 2]", None, "invalid_request", id="not-an-object"),
    pytest.param(b"\xff\xfe", None, "invalid_request", id="not-utf8"),
    pytest.param(
        b'{"id": 1, "op": "gpio.read", "args": {"pin": 8}, "extra": 1}', 1, "invalid_request", id="extra"
    ),
    pytest.param(b'{"id": "1", "op": "gpio.read"}', None, "invalid_request", id="id-is-text"),
    pytest.param(b'{"id": 1, "id": 2, "op": "gpio.read"}', None, "invalid_request", id="duplicate-key"),
    pytest.param(
        b'{"id": 4, "op": "gpio.read", "args": {"pin": true}}', 4, "invalid_request", id="pin-is-bool"
    ),
    pytest.param(
        b'{"id": 5, "op": "gpio.read", "args": {"pin": "../x"}}', 5, "invalid_request", id="pin-path"
    ),
    pytest.param(b'{"id": 6, "op": "gpio.read", "args": {}}', 6, "invalid_request", id="missing-field"),
    pytest.param(
        b'{"id": 7, "op": "gpio.write", "args": {"pin": 8, "value": 2}}', 7, "invalid_request", id="range"
    ),
    pytest.param(
        b'{"id": 8, "op": "uart.write", "args": {"name": "ISU0", "data": "%%"}}',
        8,
        "invalid_request",
        id="b64",
    ),
    pytest.param(
        b'{"id": 9, "op": "adc.read", "args": {"controller": "ADC0", "channel": NaN}}',
        None,
        "invalid_request",
        id="nan",
    ),
    pytest.param(b'{"id": 10, "op": "gpio.read", "args": {"pin": 1e999}}', None, "invalid_request", id="inf"),
    pytest.param(b"[" * 5000 + b"]" * 5000, None, "invalid_request", id="deep"),
    pytest.param(b'{"id": 11, "op": "shell.exec", "args": {}}', 11, "unknown_operation", id="unknown-op"),
    pytest.param(
        b'{"id": 12, "op": "methods.respond", "args": {"call_id": "m9", "status": 200}}',
        12,
        "unknown_call",
        id="no-such-call",
    ),
]


@pytest.mark.parametrize(("frame", "request_id", "code"), MALFORMED)
async def test_a_malformed_frame_is_answered_with_its_code(
    world: World, frame: bytes, request_id: int | None, code: str
) -> None:
    async with world.serve(EVERYTHING) as server:
        client = await RawClient.connect(world.socket_path(COMPONENT))
        await client.send(frame + b"\n")
        answer = await client.frame()
        await client.request(99, "gpio.read", pin=8)
        follow_up = await client.frame()
        client.close()
    assert answer["id"] == request_id
    assert error_code(answer) == code
    assert follow_up == {"id": 99, "result": {"value": 0}}
    assert server.stats.violations == 0


async def test_a_connection_that_keeps_sending_garbage_is_closed(world: World) -> None:
    limits = AppApiLimits(max_consecutive_invalid_frames=4)
    async with world.serve(EVERYTHING, limits=limits) as server:
        client = await RawClient.connect(world.socket_path(COMPONENT))
        for index in range(3):
            await client.send(b"garbage\n")
            assert error_code(await client.frame()) == "invalid_request"
            if index == 1:  # a valid request resets the count
                await client.request(1, "gpio.read", pin=8)
                assert (await client.frame())["id"] == 1
        await client.send(b"garbage\ngarbage\ngarbage\n")
        codes = [error_code(await client.frame()) for _ in range(4)]
        assert await client.closed()
        assert server.stats.closed_for_invalid_frames == 1
        await wait_until(lambda: server.connection_count == 0)
    assert codes == ["invalid_request", "invalid_request", "invalid_request", "too_many_invalid_frames"]


async def test_requests_beyond_the_concurrent_bound_are_refused_at_once(world: World) -> None:
    limits = AppApiLimits(max_concurrent_requests=3)
    world.telemetry.hold()
    async with world.serve(CLOUD_ONLY, limits=limits):
        client = await RawClient.connect(world.socket_path(COMPONENT))
        for request_id in range(1, 5):
            await client.request(request_id, "telemetry.send", body=f"m{request_id}")
        refused = await client.frame()
        await wait_until(lambda: world.telemetry.waiting == 3)
        world.telemetry.release()
        answers = [await client.frame() for _ in range(3)]
        client.close()
    assert refused["id"] == 4
    assert error_code(refused) == "too_many_requests"
    assert sorted(answer["id"] for answer in answers) == [1, 2, 3]  # type: ignore[type-var]
    assert [message.body for message in world.telemetry.messages] == [b"m1", b"m2", b"m3"]


async def test_an_application_that_does_not_read_its_pushes_is_disconnected(world: World) -> None:
    limits = AppApiLimits(max_pending_pushes=8)
    async with world.serve(EVERYTHING, limits=limits) as server:
        client = await RawClient.connect(world.socket_path(COMPONENT))
        await client.request(1, "events.subscribe")
        assert (await client.frame()) == {"id": 1, "result": {}}
        event = SystemEvent(SystemEventKind.UPDATE_PENDING, {"note": "x" * 200})
        published = 0
        while server.connection_count and published < 200_000:
            world.events.publish(event)
            published += 1
            if published % 64 == 0:
                await asyncio.sleep(0)
        assert server.connection_count == 0
        assert server.stats.closed_for_push_overflow == 1
        assert world.events.publish(event) == 0
        client.close()


async def test_frames_too_many_connections_and_the_socket_are_bounded(world: World) -> None:
    limits = AppApiLimits(max_connections=2)
    async with world.serve(EVERYTHING, limits=limits) as server:
        path = world.socket_path(COMPONENT)
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        first, second = await RawClient.connect(path), await RawClient.connect(path)
        third = await RawClient.connect(path, hello=False)
        assert error_code(await third.frame()) == "too_many_connections"
        assert await third.closed()
        for client in (first, second):
            client.close()
        await wait_until(lambda: server.connection_count == 0)
    assert not path.exists()


async def test_a_socket_path_that_is_not_a_socket_is_left_alone(world: World) -> None:
    path = world.socket_path(COMPONENT)
    path.parent.mkdir(mode=0o711)
    path.write_text("precious")
    with pytest.raises(ConfigurationError, match="not a socket"):
        async with world.serve(EVERYTHING):
            pass
    assert path.read_text() == "precious"
    path.unlink()
    path.parent.chmod(0o777)
    with pytest.raises(ConfigurationError, match="writable by nobody else"):
        async with world.serve(EVERYTHING):
            pass


def test_limits_and_router_bounds_are_validated() -> None:
    for options in ({"max_frame_bytes": 100}, {"max_frame_bytes": 2**21}, {"max_pending_pushes": 0}):
        with pytest.raises(ValueError, match=r"max_frame_bytes|max_pending_pushes"):
            AppApiLimits(**options)
    with pytest.raises(TypeError):
        AppApiLimits(max_connections=True)
    with pytest.raises(ValueError, match="max_methods_per_app"):
        CloudRouter(MemoryCloudLink(), max_methods_per_app=0)


def test_every_operation_and_error_code_of_the_protocol_is_documented() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "wire.md").read_text()
    for op in protocol.OPERATIONS:
        assert f"`{op}`" in docs, op
    for code in protocol.ErrorCode:
        assert f"`{code.value}`" in docs, code


_json: st.SearchStrategy[Json] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.binary(max_size=200) | _json.map(lambda value: json.dumps(value).encode()))
def test_property_any_frame_decodes_to_a_request_or_is_refused_with_a_code(frame: bytes) -> None:
    refused: protocol.FrameRefused | None = None
    try:
        protocol.parse_args(protocol.decode_request(frame))
    except protocol.FrameRefused as error:
        refused = error
    assert refused is None or refused.code in ("invalid_request", "unknown_operation")


@given(st.dictionaries(st.sampled_from([COMPONENT, OTHER_COMPONENT]), _json, max_size=2), _json, _json)
def test_property_a_reported_patch_never_changes_another_namespace(
    apps: dict[str, Json], agent: Json, value: Json
) -> None:
    before: JsonObject = {"apps": dict(apps), "agent": agent}
    after = twin_rules.merge(before, protocol.reported_patch(COMPONENT, {"k": value}))
    assert after.get("agent") == before.get("agent")
    assert protocol.app_namespace(after, OTHER_COMPONENT) == protocol.app_namespace(before, OTHER_COMPONENT)


# ---------------------------------------------------------------------- who may connect


def free_uid(start: int) -> int:
    uid = start
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@requires_root
async def test_as_root_only_the_applications_own_user_may_connect(world: World) -> None:
    own = AppIdentity(uid=free_uid(201_500), gid=free_uid(201_500))
    stranger = free_uid(own.uid + 1)
    async with world.serve(EVERYTHING, identity=own) as server:
        path = world.socket_path(COMPONENT)
        info = os.stat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (own.uid, own.gid, 0o600)

        root = await RawClient.connect(path, hello=False)  # root passes the file mode, not SO_PEERCRED
        assert await root.frame() == {
            "id": None,
            "error": {"code": "peer_refused", "message": "this socket belongs to another user"},
        }
        assert await root.closed()
        assert server.stats.peers_refused == 1

        other = await App.start(world, user=stranger)
        refused = await other.line()
        await other.stop()
        assert refused["error"] == "connection_failed"
        assert "Permission denied" in str(refused["message"])

        async with app(world, user=own.uid) as running:
            assert await running.ok("gpio_write", 12, 1) is None
        assert server.stats.connections == 1


@requires_root
async def test_a_supervised_application_reaches_its_socket_as_its_own_user(world: World) -> None:
    apps = AppWorld(world.base / "supervised")
    apps.base.mkdir(mode=0o755)
    identity = await asyncio.to_thread(
        UidRangeIdentities(apps.storage_dir / ".uids.json").identity_for, COMPONENT
    )
    socket_path = world.socket_path(COMPONENT)
    body = f"""
import sys
sys.path.insert(0, {str(world.base / "lib")!r})
from appkit import AgentClient
with AgentClient() as agent:
    agent.send_telemetry({{"uid_ok": True}})
    print("pin", agent.gpio_read(8), flush=True)
    try:
        agent.gpio_read(9)
    except Exception as error:
        print("refused", error.code, flush=True)
import time
time.sleep(60)
"""
    launched = await apps.launch_script(body, own_user=True)
    config = SupervisorConfig(storage_dir=apps.storage_dir, agent_socket=socket_path, stop_grace_seconds=1.0)
    world.peripherals.script_gpio(8, 1)
    async with (
        world.serve(EVERYTHING, identity=identity) as server,
        Supervisor(config, report=apps.reporter, as_root=True) as supervisor,
    ):
        handle = await supervisor.start(launched)
        await wait_until(lambda: "refused" in handle.output_tail())
        assert handle.output_tail().splitlines() == ["pin 1", "refused capability_not_declared"]
        assert server.stats.peers_refused == 0
    assert [message.body for message in world.telemetry.messages] == [b'{"uid_ok":true}']
    assert world.violations.violations == [Violation(COMPONENT, "Gpio", 9)]


# ---------------------------------------------------------------------- the Linux backend, on a fake tree


def test_linux_peripherals_drive_sysfs_gpio_adc_and_pwm(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    gpio = sysfs / "class" / "gpio" / "gpio17"
    gpio.mkdir(parents=True)
    (sysfs / "class" / "gpio" / "export").write_text("")
    for name, content in (("direction", "in"), ("value", "1\n")):
        (gpio / name).write_text(content)
    iio = sysfs / "bus" / "iio" / "devices" / "iio:device0"
    iio.mkdir(parents=True)
    (iio / "in_voltage3_raw").write_text("2047\n")
    pwm = sysfs / "class" / "pwm" / "pwmchip0" / "pwm1"
    pwm.mkdir(parents=True)
    for name in ("period", "duty_cycle", "enable"):
        (pwm / name).write_text("0")
    hardware = LinuxPeripherals(
        LinuxPeripheralMap(gpio={"LED": 17}, sysfs_root=sysfs, dev_root=tmp_path / "dev")
    )

    assert hardware.gpio_read(17) == 1
    hardware.gpio_write("LED", 0)
    assert ((gpio / "direction").read_text(), (gpio / "value").read_text()) == ("out", "0")
    assert hardware.adc_read(0, 3) == 2047
    assert hardware.adc_read("iio:device0", 3) == 2047
    hardware.pwm_set("pwmchip0", 1, 20_000_000, 1_500_000, True)
    assert [(pwm / name).read_text() for name in ("period", "duty_cycle", "enable")] == [
        "20000000",
        "1500000",
        "1",
    ]

    with pytest.raises(PeripheralUnavailable, match="not mapped"):
        hardware.gpio_read("BUTTON")
    with pytest.raises(PeripheralUnavailable, match="does not exist"):
        hardware.gpio_read(18)  # the export file takes it, but no gpio18 appears
    with pytest.raises(PeripheralUnavailable):
        hardware.i2c_transfer(1, 0x48, b"\x00", 2)
    with pytest.raises(PeripheralUnavailable):
        hardware.spi_transfer(0, 0, b"\x9f", 3)
    with pytest.raises(PeripheralUnavailable, match="not mapped"):
        hardware.uart_open("ISU0", 115_200)


def test_linux_uart_is_raw_exclusive_and_echoes_through_a_pseudo_terminal(tmp_path: Path) -> None:
    controller, device = os.openpty()
    try:
        name = os.ttyname(device)
        hardware = LinuxPeripherals(LinuxPeripheralMap(uart={"ISU0": Path(name)}))
        port = hardware.uart_open("ISU0", 9600)
        try:
            with pytest.raises(Exception, match="already open"):
                hardware.uart_open("ISU0", 9600)
            assert port.write(b"AT\r\n") == 4
            assert os.read(controller, 64) == b"AT\r\n"  # raw: no CR/LF translation
            os.write(controller, b"OK\r\n")
            assert port.read(64, 2.0) == b"OK\r\n"
            assert port.read(64, 0.05) == b""
        finally:
            port.close()
        hardware.uart_open("ISU0", 9600).close()  # free again
    finally:
        os.close(controller)
        os.close(device)


def test_the_spi_ioctl_layout_matches_the_kernels() -> None:
    assert spi_message_request(1) == 0x40206B00
    assert spi_message_request(2) == 0x40406B00
    transfer = spi_transfer_struct(0x1000, 0x2000, 3)
    assert len(transfer) == 32
    order = sys.byteorder
    assert transfer[:20] == (0x1000).to_bytes(8, order) + (0x2000).to_bytes(8, order) + (3).to_bytes(4, order)
