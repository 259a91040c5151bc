"""Applications reach the network only through the agent's allow-listing proxy, with real processes.

As root (how these tests run), each application runs in a network namespace of its own with only loopback,
where the agent's proxy listens: a direct connection goes nowhere, a ``CONNECT`` to a declared destination
is relayed, anything else is refused 403 and reported. The applications are small scripts run by the
system's ``/usr/bin/python3`` (their own users cannot reach the venv under ``/root``); they print one JSON
line per result. Host names are mapped by a :class:`StaticResolver` handed to the supervisor, not by
``/etc/hosts``. The non-root mode is tested by telling the supervisor it is not root (``as_root=False``),
not by skipping. The request parser and the address screening are pure, and tested with tables.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from fleetward.agent.launch import LaunchedApp
from fleetward.agent.manifest import AllowedConnection, Capabilities, Manifest
from fleetward.agent.netns import PROXY_VARIABLES, NetworkNamespace
from fleetward.agent.package import build_package
from fleetward.agent.proxy import (
    ConnectProxy,
    IPAddress,
    ProxyLimits,
    StaticResolver,
    parse_connect_request,
    render_answer,
    screen_addresses,
)
from fleetward.agent.sandbox import NETWORK_NOT_ENFORCED, NOT_YET_ENFORCED, Enforcement
from fleetward.agent.supervisor import AppHandle, AppState, RestartPolicy, Supervisor, SupervisorConfig
from fleetward.clock import FakeClock
from fleetward.errors import CapabilityNotDeclared, InvalidInput, PayloadTooLarge
from fleetward.wire.reports import CrashReport
from tests.agent_apps import COMPONENT, AppWorld, reachable_directory, running_as_root, script

requires_root = pytest.mark.skipif(not running_as_root(), reason="network namespaces need root")

#: Helpers every test application starts with: the proxy from its environment, a tunnel, a direct try.
PRELUDE = r"""
import json, os, socket, sys, time

def say(**fields):
    print(json.dumps(fields), flush=True)

def proxy_port():
    url = os.environ.get("HTTPS_PROXY")
    return None if url is None else int(url.rsplit(":", 1)[1])

def tunnel(target):
    s = socket.create_connection(("127.0.0.1", proxy_port()), timeout=5)
    s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = s.recv(1)
        if not byte:
            break
        head += byte
    status = int(head.split()[1]) if head else 0
    if status != 200:
        body = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                body += chunk
        except ConnectionResetError:
            pass  # a refusal sent before the request was read: the request then resets the connection
        s.close()
        return None, status, body.decode()
    return s, status, ""

def exchange(s):
    greeting = s.recv(64)
    s.sendall(b"ping")
    return greeting.decode(), s.recv(64).decode()

def direct(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as error:
        return errno_name(error)

def errno_name(error):
    import errno
    return errno.errorcode.get(error.errno, str(error))
"""


class EchoServer:
    """A server in the test's (the device's) namespace: greets with ``hello``, then echoes in capitals."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._serve, "0.0.0.0", 0)  # noqa: S104 - reached by IP
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        try:
            writer.write(b"hello")
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class RecordingResolver(StaticResolver):
    """A fixed table that also records which names it was asked for."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        super().__init__(table)
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        self.asked.append(host)
        return await super().resolve(host, port)


class Blocked:
    """The ``on_blocked`` callback: records each refusal."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, component_id: str, host: str, port: int) -> None:
        self.calls.append((component_id, host, port))


@pytest.fixture
def world() -> Iterator[AppWorld]:
    with reachable_directory() as base:
        yield AppWorld(base)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


def device_address() -> str:
    """An address of this machine outside loopback (where the default route leaves), or a documentation
    address when there is none: from inside an application's namespace, neither is reachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
        except OSError:
            return "203.0.113.1"
        address: str = probe.getsockname()[0]
        return address


async def launch(
    world: AppWorld,
    body: str,
    *,
    connections: Sequence[str] = (),
    tcp_ports: Sequence[int] = (),
    own_user: bool = True,
    component_id: str = COMPONENT,
) -> LaunchedApp:
    capabilities = Capabilities(
        allowed_connections=tuple(AllowedConnection.parse(entry) for entry in connections),
        allowed_tcp_server_ports=tuple(tcp_ports),
    )
    manifest = Manifest(
        name="net-app", component_id=component_id, entry_point="bin/app", capabilities=capabilities
    )
    package = build_package(manifest, {"bin/app": script(PRELUDE + body, own_user=own_user)})
    return await world.launcher().launch(world.install(package, component_id=component_id, name=component_id))


def supervisor(
    world: AppWorld,
    *,
    as_root: bool = True,
    resolver: StaticResolver | None = None,
    blocked: Blocked | None = None,
    proxy: ProxyLimits | None = None,
    **options: object,
) -> Supervisor:
    config = SupervisorConfig(
        storage_dir=world.storage_dir,
        stop_grace_seconds=1.0,
        output_drain_seconds=1.0,
        proxy=proxy or ProxyLimits(connect_timeout_seconds=3.0),
        **options,  # type: ignore[arg-type]
    )
    return Supervisor(
        config,
        report=world.reporter,
        as_root=as_root,
        clock=FakeClock(),
        resolver=resolver or StaticResolver({}),
        on_blocked=blocked,
    )


async def wait_until(condition: Callable[[], bool], timeout_seconds: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        await asyncio.sleep(0.02)


def results(handle: AppHandle) -> dict[str, object]:
    merged: dict[str, object] = {}
    for line in handle.output_tail().splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


async def finished(handle: AppHandle) -> dict[str, object]:
    """Wait for the application's ``done`` line; return everything it said."""
    try:
        await wait_until(lambda: "done" in results(handle))
    except TimeoutError:
        raise AssertionError(f"the application did not finish: {handle.error_tail()!r}") from None
    return results(handle)


def proc_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")
    return dict(entry.decode().split("=", 1) for entry in entries if entry)


def namespace_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def processes_in(namespace: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino == namespace:
                    found.append(int(entry.name))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return found


def held_sockets_and_namespaces() -> set[str]:
    """What this process holds open that could keep a namespace alive: sockets and namespace files."""
    held = set()
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(entry)
        except FileNotFoundError:
            continue
        if target.startswith(("socket:", "net:")):
            held.add(target)
    return held


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- as root: the application's own namespace -----------------------------------------------------------


@requires_root
async def test_a_direct_connection_from_the_namespace_reaches_nothing(
    world: AppWorld, echo: EchoServer
) -> None:
    outside = device_address()
    body = f"""
say(loopback=direct("127.0.0.1", {echo.port}), outside=direct("{outside}", {echo.port}),
    interfaces=sorted(name for _, name in socket.if_nameindex()), done=True)
time.sleep(60)
"""
    launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"])
    async with supervisor(world) as running:
        said = await finished(await running.start(launched))
    assert said["loopback"] == "ECONNREFUSED"  # its own loopback, where nothing listens on that port
    assert said["outside"] == "ENETUNREACH"  # no interface but lo, no route
    assert said["interfaces"] == ["lo"]
    assert echo.peers == []


@requires_root
async def test_through_the_proxy_declared_destinations_work_both_ways(
    world: AppWorld, echo: EchoServer
) -> None:
    port = echo.port
    resolver = RecordingResolver({"echo.test": ["127.0.0.1"], "a.svc.test": ["127.0.0.1"]})
    body = f"""
for key, target in (("by_ip", "127.0.0.1:{port}"), ("by_name", "echo.test:{port}"),
                    ("by_wildcard", "a.svc.test:{port}")):
    s, status, _ = tunnel(target)
    greeting, reply = exchange(s)
    s.close()
    say(**{{key: [status, greeting, reply]}})
say(proxy=os.environ["HTTPS_PROXY"], done=True)
time.sleep(60)
"""
    connections = [f"127.0.0.1:{port}", f"echo.test:{port}", f"*.svc.test:{port}"]
    launched = await launch(world, body, connections=connections)
    blocked = Blocked()
    async with supervisor(world, resolver=resolver, blocked=blocked) as running:
        handle = await running.start(launched)
        said = await finished(handle)
        assert handle.pid is not None
        environment = proc_environment(handle.pid)
    for key in ("by_ip", "by_name", "by_wildcard"):
        assert said[key] == [200, "hello", "PING"], key
    assert said["proxy"] == "http://127.0.0.1:3128"
    assert {name: environment[name] for name in PROXY_VARIABLES} == dict.fromkeys(
        PROXY_VARIABLES, "http://127.0.0.1:3128"
    )
    assert echo.peers == ["127.0.0.1"] * 3  # the agent connected, from the device's namespace
    assert resolver.asked == ["echo.test", "a.svc.test"]
    assert blocked.calls == []


@requires_root
async def test_an_undeclared_destination_is_refused_403_reported_and_never_opened(
    world: AppWorld, echo: EchoServer
) -> None:
    async with EchoServer() as other:
        body = f"""
for key, target in (("other_port", "127.0.0.1:{other.port}"), ("other_host", "example.com:443"),
                    ("not_http", None)):
    if target is None:
        s = socket.create_connection(("127.0.0.1", proxy_port()), timeout=5)
        s.sendall(b"GET http://example.com/ HTTP/1.1\\r\\nHost: example.com\\r\\n\\r\\n")
        answer = s.recv(4096).decode()
        say(**{{key: [int(answer.split()[1]), answer.split("\\r\\n\\r\\n", 1)[1]]}})
        continue
    s, status, reason = tunnel(target)
    say(**{{key: [status, reason]}})
say(done=True)
time.sleep(60)
"""
        resolver = RecordingResolver({"example.com": ["127.0.0.1"]})
        launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"])
        blocked = Blocked()
        async with supervisor(world, resolver=resolver, blocked=blocked) as running:
            said = await finished(await running.start(launched))
        assert other.peers == []
    assert said["other_port"] == [
        403,
        f"capability_not_declared: the manifest does not declare AllowedConnections 127.0.0.1:{other.port}\n",
    ]
    assert said["other_host"] == [
        403,
        "capability_not_declared: the manifest does not declare AllowedConnections example.com:443\n",
    ]
    not_http = said["not_http"]
    assert isinstance(not_http, list)
    assert not_http[0] == 405
    assert "only opens tunnels" in not_http[1]
    assert blocked.calls == [(COMPONENT, "127.0.0.1", other.port), (COMPONENT, "example.com", 443)]
    assert resolver.asked == []  # an undeclared name is not even looked up


@requires_root
async def test_an_application_without_allowed_connections_has_no_proxy_and_no_network(
    world: AppWorld, echo: EchoServer
) -> None:
    body = f"""
say(proxy=os.environ.get("HTTPS_PROXY"), at_3128=direct("127.0.0.1", 3128),
    loopback=direct("127.0.0.1", {echo.port}), outside=direct("{device_address()}", {echo.port}), done=True)
time.sleep(60)
"""
    launched = await launch(world, body)
    async with supervisor(world) as running:
        handle = await running.start(launched)
        said = await finished(handle)
        assert handle.pid is not None
        environment = proc_environment(handle.pid)
    assert said == {
        "proxy": None,
        "at_3128": "ECONNREFUSED",
        "loopback": "ECONNREFUSED",
        "outside": "ENETUNREACH",
        "done": True,
    }
    assert not set(PROXY_VARIABLES) & set(environment)
    assert echo.peers == []


@requires_root
async def test_a_declared_name_that_resolves_to_loopback_is_refused_unless_the_ip_is_declared(
    world: AppWorld, echo: EchoServer
) -> None:
    port = echo.port
    resolver = RecordingResolver({"rebind.test": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "10.1.2.3"]})
    body = f"""
for key, target in (("rebind", "rebind.test:{port}"), ("mixed", "mixed.test:{port}")):
    s, status, reason = tunnel(target)
    say(**{{key: [status, reason]}})
say(done=True)
time.sleep(60)
"""
    launched = await launch(world, body, connections=[f"rebind.test:{port}", f"mixed.test:{port}"])
    blocked = Blocked()
    async with supervisor(world, resolver=resolver, blocked=blocked) as running:
        said = await finished(await running.start(launched))
    assert said["rebind"] == [
        403,
        f"capability_not_declared: rebind.test resolves to 127.0.0.1, which is not a public address; "
        f"name 127.0.0.1:{port} in AllowedConnections to allow it\n",
    ]
    assert said["mixed"][0] == 403  # type: ignore[index]
    assert blocked.calls == [(COMPONENT, "rebind.test", port), (COMPONENT, "mixed.test", port)]
    assert echo.peers == []


@requires_root
async def test_the_proxy_bounds_its_tunnels_and_closes_idle_ones(world: AppWorld, echo: EchoServer) -> None:
    body = f"""
target = "127.0.0.1:{echo.port}"
first, second = tunnel(target), tunnel(target)
third = tunnel(target)
say(statuses=[first[1], second[1], third[1]], refusal=third[2])
started = time.monotonic()
exchange(first[0])
closed = first[0].recv(64)
say(idle_closed=[closed.decode(), round(time.monotonic() - started, 1)])
time.sleep(0.2)
fourth = tunnel(target)
say(after=fourth[1], done=True)
time.sleep(60)
"""
    limits = ProxyLimits(max_tunnels=2, idle_timeout_seconds=0.6, connect_timeout_seconds=3.0)
    launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"])
    async with supervisor(world, proxy=limits) as running:
        said = await finished(await running.start(launched))
    assert said["statuses"] == [200, 200, 503]
    assert said["refusal"] == "proxy_busy: at most 2 connections through the proxy at once\n"
    idle_closed = said["idle_closed"]
    assert isinstance(idle_closed, list)
    assert idle_closed[0] == ""  # the proxy ended the tunnel
    assert 0.4 <= idle_closed[1] <= 3.0
    assert said["after"] == 200  # the idle tunnels ended, so their places are free again


@requires_root
async def test_stopping_leaves_no_proxy_listener_forwarder_or_namespace_behind(
    world: AppWorld, echo: EchoServer
) -> None:
    server_port = free_port()
    body = f"""
listener = socket.create_server(("0.0.0.0", {server_port}))
s, status, _ = tunnel("127.0.0.1:{echo.port}")
say(status=status, done=True)
time.sleep(60)
"""
    launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"], tcp_ports=[server_port])
    before = held_sockets_and_namespaces()
    async with supervisor(world) as running:
        handle = await running.start(launched)
        said = await finished(handle)
        assert handle.pid is not None
        namespace = namespace_of(handle.pid)
        assert namespace != namespace_of(os.getpid())
        assert held_sockets_and_namespaces() - before  # the proxy, its tunnel, the forwarder, the namespace
    assert said["status"] == 200
    await wait_until(lambda: held_sockets_and_namespaces() <= before, timeout_seconds=5)  # the echo side too
    assert processes_in(namespace) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server_port), timeout=2).close()


@requires_root
async def test_a_declared_tcp_server_port_is_forwarded_into_the_namespace_and_no_other(
    world: AppWorld,
) -> None:
    declared, undeclared = free_port(), free_port()
    body = f"""
import threading
def serve(port):
    listener = socket.create_server(("0.0.0.0", port))
    while True:
        connection, peer = listener.accept()
        connection.sendall(("from app, you are " + peer[0]).encode())
        connection.sendall(connection.recv(64).upper())
        connection.close()
for port in ({declared}, {undeclared}):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
time.sleep(0.2)
say(done=True)
time.sleep(60)
"""
    launched = await launch(world, body, tcp_ports=[declared])
    async with supervisor(world) as running:
        await finished(await running.start(launched))
        reader, writer = await asyncio.open_connection("127.0.0.1", declared)
        greeting = await reader.read(64)
        writer.write(b"ping")
        reply = await reader.read(64)
        writer.close()
        await writer.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", undeclared)
    assert greeting == b"from app, you are 127.0.0.1"
    assert reply == b"PING"


@requires_root
async def test_a_run_whose_network_cannot_be_made_does_not_start_and_leaves_nothing(world: AppWorld) -> None:
    """Fail closed: a declared server port the device already uses makes the start fail, reported as a
    crash with the reason, with the namespace and the proxy made so far closed again."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        launched = await launch(world, "say(done=True)", connections=["example.com:443"], tcp_ports=[port])
        before = held_sockets_and_namespaces()
        restart = RestartPolicy(crash_loop_crashes=1)
        async with supervisor(world, restart=restart) as running:
            handle = await running.start(launched)
            await handle.wait_for(AppState.CRASH_LOOP)
        assert held_sockets_and_namespaces() <= before
    crash = world.reporter.reports[0]
    assert isinstance(crash, CrashReport)
    assert crash.exit_code == 127
    assert "could not start" in crash.error_tail
    assert "Address already in use" in crash.error_tail


@requires_root
async def test_as_root_with_network_namespaces_off_the_gap_is_stated(
    world: AppWorld, echo: EchoServer
) -> None:
    body = f"""
say(direct=direct("127.0.0.1", {echo.port}), proxy=os.environ["HTTPS_PROXY"], done=True)
time.sleep(60)
"""
    launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"])
    async with supervisor(world, network_namespaces=False) as running:
        assert running.enforcement.not_enforced() == (NETWORK_NOT_ENFORCED, *NOT_YET_ENFORCED)
        handle = await running.start(launched)
        said = await finished(handle)
        assert handle.pid is not None
        assert namespace_of(handle.pid) == namespace_of(os.getpid())
    assert said["direct"] == "connected"
    assert said["proxy"] != "http://127.0.0.1:3128"


@requires_root
async def test_a_namespace_keeps_the_listeners_made_inside_it() -> None:
    port = free_port()
    namespace = await NetworkNamespace.create()
    try:
        listener = await namespace.listen("127.0.0.1", port)
        with listener:
            assert namespace.name == f"net:[{namespace.inode}]"
            assert namespace.inode != namespace_of(os.getpid())
            with pytest.raises(ConnectionRefusedError):  # not in the agent's namespace
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            inside = await namespace.connect("127.0.0.1", port)
            inside.close()
    finally:
        namespace.close()
    assert os.readlink("/proc/self/ns/net") == f"net:[{namespace_of(os.getpid())}]"
    with pytest.raises(ValueError, match="closed"):
        _ = namespace.descriptor


# --- not as root: the proxy filters, nothing stops a direct connection --------------------------------------


async def test_not_as_root_the_proxy_still_filters_but_a_direct_connection_is_not_stopped(
    world: AppWorld, echo: EchoServer
) -> None:
    body = f"""
s, status, _ = tunnel("127.0.0.1:{echo.port}")
say(allowed=[status, *exchange(s)])
say(refused=tunnel("example.com:443")[1], direct=direct("127.0.0.1", {echo.port}),
    proxy=os.environ["HTTPS_PROXY"], done=True)
time.sleep(60)
"""
    launched = await launch(world, body, connections=[f"127.0.0.1:{echo.port}"], own_user=False)
    blocked = Blocked()
    async with supervisor(world, as_root=False, blocked=blocked) as running:
        assert NETWORK_NOT_ENFORCED in running.enforcement.not_enforced()
        handle = await running.start(launched)
        said = await finished(handle)
        assert handle.pid is not None
        assert namespace_of(handle.pid) == namespace_of(os.getpid())
    assert said["allowed"] == [200, "hello", "PING"]
    assert said["refused"] == 403
    assert said["direct"] == "connected"  # the stated gap
    proxy = str(said["proxy"])
    assert proxy.startswith("http://127.0.0.1:")
    assert proxy != "http://127.0.0.1:3128"  # a free port of the agent's loopback
    assert blocked.calls == [(COMPONENT, "example.com", 443)]


@pytest.mark.parametrize(
    ("as_root", "namespaces", "network_gap"),
    [(True, True, False), (True, False, True), (False, True, True), (False, False, True)],
)
def test_the_enforcement_says_when_the_network_is_not_confined(
    as_root: bool, namespaces: bool, network_gap: bool
) -> None:
    enforcement = Enforcement(as_root=as_root, agent_uid=1000, network_namespaces=namespaces)
    gaps = enforcement.not_enforced()
    assert enforcement.isolates_network is not network_gap
    assert (NETWORK_NOT_ENFORCED in gaps) is network_gap
    assert any(gap.startswith("network") for gap in gaps) is network_gap
    assert set(NOT_YET_ENFORCED) <= set(gaps)
    assert Enforcement(as_root=True, agent_uid=0).isolates_network  # the default


# --- the proxy alone, in the test's namespace ---------------------------------------------------------------


async def exchange_head(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split()[1]), answer


def declaring(*entries: str) -> Capabilities:
    return Capabilities(allowed_connections=tuple(AllowedConnection.parse(entry) for entry in entries))


async def test_the_proxy_answers_bad_requests_without_calling_on_blocked(echo: EchoServer) -> None:
    blocked = Blocked()
    limits = ProxyLimits(max_request_head_bytes=512, request_timeout_seconds=0.3)
    proxy = ConnectProxy(COMPONENT, declaring(f"127.0.0.1:{echo.port}"), limits=limits, on_blocked=blocked)
    async with proxy:
        proxy.start(socket.create_server(("127.0.0.1", 0)))
        assert (await exchange_head(proxy.port, b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n"))[0] == 400
        assert (await exchange_head(proxy.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + b"X: y\r\n" * 100))[
            0
        ] == 431
        assert (await exchange_head(proxy.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n"))[0] == 408
        status, answer = await exchange_head(proxy.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
        assert status == 403
        assert b"Fleetward-Refusal: capability_not_declared\r\n" in answer
    assert blocked.calls == [(COMPONENT, "127.0.0.1", 1)]
    assert proxy.active == 0


async def test_a_declared_destination_that_does_not_answer_is_502(echo: EchoServer) -> None:
    closed = free_port()
    proxy = ConnectProxy(COMPONENT, declaring(f"127.0.0.1:{closed}"), resolver=StaticResolver({}))
    async with proxy:
        proxy.start(socket.create_server(("127.0.0.1", 0)))
        status, answer = await exchange_head(
            proxy.port, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n".encode()
        )
    assert status == 502
    assert b"proxy_upstream_unreachable: cannot connect to 127.0.0.1:" in answer


async def test_a_tunnel_carries_megabytes_both_ways_intact_with_small_buffers() -> None:
    """The relay reads at most a buffer's worth and waits for the other side to take it, so a large
    transfer goes through bounded buffers; what comes back is exactly what went, in capitals."""
    async with EchoServer() as echo:
        limits = ProxyLimits(relay_buffer_bytes=4096, max_request_head_bytes=1024)
        proxy = ConnectProxy(COMPONENT, declaring(f"127.0.0.1:{echo.port}"), limits=limits)
        async with proxy:
            proxy.start(socket.create_server(("127.0.0.1", 0)))
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
            assert await reader.readuntil(b"\r\n\r\n") == render_answer(200)
            assert await reader.readexactly(5) == b"hello"
            payload = os.urandom(2 * 1024 * 1024).hex().lower().encode()  # 4 MiB of hex digits
            received = bytearray()

            async def send() -> None:
                for offset in range(0, len(payload), 65536):
                    writer.write(payload[offset : offset + 65536])
                    await writer.drain()
                writer.write_eof()

            async def receive() -> None:
                while chunk := await reader.read(65536):
                    received.extend(chunk)

            await asyncio.wait_for(asyncio.gather(send(), receive()), timeout=60)
            writer.close()
            await writer.wait_closed()
    assert bytes(received) == payload.upper()


# --- the pure core ------------------------------------------------------------------------------------------

GOOD_REQUESTS = [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", ("example.com", "dns", 443)),
    (b"CONNECT Hub.Example.COM:8883 HTTP/1.0\r\n\r\n", ("hub.example.com", "dns", 8883)),
    (
        b"CONNECT 10.0.0.5:1883 HTTP/1.1\r\nUser-Agent: x\r\nProxy-Connection: keep-alive\r\n\r\n",
        ("10.0.0.5", "ipv4", 1883),
    ),
    (b"CONNECT [2001:DB8::1]:443 HTTP/1.1\r\n\r\n", ("2001:db8::1", "ipv6", 443)),
    (b"CONNECT a.b:65535 HTTP/1.1\r\nEmpty:\r\n\r\n", ("a.b", "dns", 65535)),
]


@pytest.mark.parametrize(("head", "expected"), GOOD_REQUESTS)
def test_a_connect_request_names_one_host_and_port(head: bytes, expected: tuple[str, str, int]) -> None:
    destination = parse_connect_request(head)
    assert (destination.host, destination.kind, destination.port) == expected


BAD_REQUESTS = [
    (
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "proxy_method_not_allowed",
        "only opens",
    ),
    (b"connect example.com:443 HTTP/1.1\r\n\r\n", "proxy_method_not_allowed", "not connect"),
    (b"CONNECT example.com HTTP/1.1\r\n\r\n", "proxy_request_malformed", "has no port"),
    (b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com:0443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com:+443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com:443x HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com: HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT *.example.com:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "not a wildcard"),
    (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "has no port"),
    (b"CONNECT [::1] HTTP/1.1\r\n\r\n", "proxy_request_malformed", "followed by :port"),
    (b"CONNECT [10.0.0.1]:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "only an IPv6"),
    (b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "is not 1 to 63"),
    (b"CONNECT example.com:443/x HTTP/1.1\r\n\r\n", "proxy_request_malformed", "from 1 to 65535"),
    (b"CONNECT example.com.:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "is not 1 to 63"),
    (b"CONNECT 0.0.0.0:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "unspecified"),
    (b"CONNECT  example.com:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "not a request line"),
    (b"CONNECT example.com:443\r\n\r\n", "proxy_request_malformed", "not a request line"),
    (b"CONNECT example.com:443 HTTP/2.0\r\n\r\n", "proxy_request_malformed", "not HTTP/1.1"),
    (b"CONNECT example.com:443 HTTP/1.1\r\n", "proxy_request_malformed", "empty line"),
    (b"CONNECT example.com:443 HTTP/1.1\nHost: x\r\n\r\n", "proxy_request_malformed", "bare CR or LF"),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost example.com\r\n\r\n",
        "proxy_request_malformed",
        "header line",
    ),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        "proxy_request_malformed",
        "header line",
    ),
    (b"CONNECT example.com:443 HTTP/1.1\r\nX: \x01\r\n\r\n", "proxy_request_malformed", "header line"),
    (b"CONNECT ex\xc3\xa4mple.com:443 HTTP/1.1\r\n\r\n", "proxy_request_malformed", "not ASCII"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nX: \x00\r\n\r\n", "proxy_request_malformed", "NUL"),
    (b"\r\n\r\n", "proxy_request_malformed", "not a request line"),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n",
        "proxy_request_too_large",
        "64 header",
    ),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nX: " + b"y" * 8200 + b"\r\n\r\n",
        "proxy_request_too_large",
        "8192 bytes",
    ),
]


@pytest.mark.parametrize(("head", "code", "reason"), BAD_REQUESTS)
def test_a_bad_connect_request_is_refused_saying_why(head: bytes, code: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_connect_request(head)
    assert refused.value.code == code
    assert reason in refused.value.message
    assert isinstance(refused.value, PayloadTooLarge) is (code == "proxy_request_too_large")


def addresses(*texts: str) -> list[IPAddress]:
    return [ipaddress.ip_address(text) for text in texts]


SCREENING = [
    # (declared, destination, resolved, kept; None when refused)
    (["hub.example.com:443"], "hub.example.com:443", ["93.184.216.34"], ["93.184.216.34"]),
    (["hub.example.com:443"], "hub.example.com:443", ["127.0.0.1"], None),
    (["hub.example.com:443"], "hub.example.com:443", ["10.0.0.5", "192.168.1.1", "172.16.0.1"], None),
    (["hub.example.com:443"], "hub.example.com:443", ["169.254.169.254"], None),
    (["hub.example.com:443"], "hub.example.com:443", ["::1", "fe80::1", "fd00::2"], None),
    (["hub.example.com:443"], "hub.example.com:443", ["::ffff:127.0.0.1"], None),
    (["hub.example.com:443"], "hub.example.com:443", ["100.64.0.1", "224.0.0.1"], None),
    (["hub.example.com:443"], "hub.example.com:443", [], None),
    (["hub.example.com:443"], "hub.example.com:443", ["127.0.0.1", "93.184.216.34"], ["93.184.216.34"]),
    (["hub.example.com:443", "10.0.0.5:443"], "hub.example.com:443", ["10.0.0.5"], ["10.0.0.5"]),
    (["hub.example.com:443", "10.0.0.5"], "hub.example.com:443", ["10.0.0.5"], ["10.0.0.5"]),
    (["hub.example.com:443", "10.0.0.5:80"], "hub.example.com:443", ["10.0.0.5"], None),
    (["hub.example.com:443", "127.0.0.1:443"], "hub.example.com:443", ["::ffff:127.0.0.1"], ["127.0.0.1"]),
    (["hub.example.com", "[fd00::2]:8883"], "hub.example.com:8883", ["fd00::2", "fd00::3"], ["fd00::2"]),
    (["10.0.0.5:1883"], "10.0.0.5:1883", [], ["10.0.0.5"]),  # an IP named in the manifest: not screened
]


@pytest.mark.parametrize(("declared", "destination", "resolved", "kept"), SCREENING)
def test_a_name_reaches_private_addresses_only_when_the_manifest_names_them(
    declared: list[str], destination: str, resolved: list[str], kept: list[str] | None
) -> None:
    capabilities = declaring(*declared)
    target = AllowedConnection.parse(destination)
    if kept is None:
        with pytest.raises(CapabilityNotDeclared) as refused:
            screen_addresses(capabilities, target, addresses(*resolved))
        assert refused.value.capability == "AllowedConnections"
        assert refused.value.detail == destination
    else:
        assert list(screen_addresses(capabilities, target, addresses(*resolved))) == addresses(*kept)


def test_proxy_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        ProxyLimits(max_tunnels=0)
    with pytest.raises(TypeError):
        ProxyLimits(max_tunnels=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ProxyLimits(idle_timeout_seconds=True)
    with pytest.raises(ValueError, match="65535"):
        ProxyLimits(proxy_port=70_000)
    assert ProxyLimits(idle_timeout_seconds=0.5).idle_timeout_seconds == 0.5


def test_a_refusal_is_a_complete_http_answer_with_its_code() -> None:
    answer = render_answer(403, "capability_not_declared", "the manifest does not declare x:1")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden"
    assert b"Content-Length: %d" % len(body) in head
    assert b"Connection: close" in head
    assert body == b"capability_not_declared: the manifest does not declare x:1\n"
    assert render_answer(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
