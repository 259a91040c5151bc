"""Each application's own network: a namespace with only loopback, and the agent's proxy inside it.

When the agent is root, every run of an application gets a fresh network namespace
(:class:`NetworkNamespace`): no interface but ``lo`` (up), no route, so nothing in it reaches the device's
network, nor the device's own loopback, nor abstract Unix sockets outside it. The agent makes the
namespace itself, on a short-lived thread of its own that ``unshare(CLONE_NEWNET)``\\ s (a namespace
change belongs to the thread that makes it; the event loop's thread never changes namespace), and keeps
it open by a descriptor. On the same kind of thread it creates, inside, the proxy's listening socket on
``127.0.0.1:<proxy_port>``: a socket stays in the namespace it was created in, wherever it is used from.
The trampoline then ``setns``\\ es the application into the namespace before it drops root, so the proxy is
listening before the application runs.

:func:`open_app_network` puts it together: the namespace, the proxy
(:class:`~fleetward.agent.proxy.ConnectProxy`, only when the manifest declares ``AllowedConnections``), a
forwarder for each declared ``AllowedTcpServerPorts`` port (:class:`InboundForwarder`), and the proxy
variables of the application's environment. When the agent is not root there is no namespace: the proxy
listens on a free port of the agent's own loopback and filters what uses it, but a direct connection is
not stopped.

The namespace lives as long as something holds it: the application's processes, the agent's descriptor,
and the sockets made in it. :meth:`AppNetwork.close` closes the agent's, so once the application's
processes are gone, nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fleetward.agent.manifest import Capabilities
from fleetward.agent.proxy import ConnectProxy, OnAllowed, OnBlocked, ProxyLimits, Resolver
from fleetward.agent.relay import Acceptor, close_stream, relay

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sh14x")

#: The variables an application's environment gets when it has a proxy: requests, httpx, urllib, curl
#: and most HTTP clients read the first four; paho-mqtt (and so the Azure IoT device SDK's MQTT) reads
#: ``mqtt_proxy`` and tunnels through ``CONNECT`` with it.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "MQTT_PROXY", "mqtt_proxy")


def _libc_call(name: str, *arguments: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, name)
    function.argtypes = [ctypes.c_int] * len(arguments)
    if function(*arguments) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{name}(CLONE_NEWNET): {os.strerror(number)}")


async def _on_own_thread(work: Callable[[], T]) -> T:
    """Run ``work`` on a new thread that ends with it: what it does to the thread's namespace dies there."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def discard(result: object) -> None:
        if isinstance(result, socket.socket | NetworkNamespace):
            result.close()  # nobody waits for it any more

    def deliver(result: T | None, error: Exception | None) -> None:
        if done.cancelled():
            discard(result)
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: Exception | None = None
        try:
            result = work()
        except Exception as failure:  # noqa: BLE001 - handed to the awaiting task, which raises it
            error = failure
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop closed meanwhile
            discard(result)

    threading.Thread(target=run, name="fleetward-netns", daemon=True).start()
    return await done


def _bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(probe, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


class NetworkNamespace:
    """A network namespace of its own, held open by a descriptor. Make one with :meth:`create`."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        self.inode = os.fstat(descriptor).st_ino

    @property
    def descriptor(self) -> int:
        """The namespace's descriptor (``/proc/…/ns/net``), for ``setns``; valid until :meth:`close`."""
        if self._descriptor < 0:
            raise ValueError("the namespace is closed")
        return self._descriptor

    @property
    def name(self) -> str:
        """As ``readlink /proc/<pid>/ns/net`` shows it for a process inside: ``net:[<inode>]``."""
        return f"net:[{self.inode}]"

    @classmethod
    async def create(cls) -> NetworkNamespace:
        """A new namespace with its loopback up; ``OSError`` without ``CAP_SYS_ADMIN``."""
        return await _on_own_thread(cls._create)

    @classmethod
    def _create(cls) -> NetworkNamespace:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _libc_call("unshare", CLONE_NEWNET)
            namespace = cls(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            try:
                _bring_loopback_up()
            except OSError:
                namespace.close()
                raise
            with contextlib.suppress(OSError):  # the thread ends anyway
                _libc_call("setns", own, CLONE_NEWNET)
            return namespace
        finally:
            os.close(own)

    async def stream_socket(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """A new TCP socket that belongs to this namespace (non-blocking)."""
        return await _on_own_thread(lambda: self._inside(lambda: socket.socket(family, socket.SOCK_STREAM)))

    async def listen(self, host: str, port: int, *, backlog: int = 64) -> socket.socket:
        """A TCP socket of this namespace listening on ``host:port``."""

        def make() -> socket.socket:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, port))
                listener.listen(backlog)
            except OSError:
                listener.close()
                raise
            return listener

        return await _on_own_thread(lambda: self._inside(make))

    async def connect(self, host: str, port: int) -> socket.socket:
        """A TCP connection made inside this namespace to ``host:port`` (its own loopback, say)."""
        connection = await self.stream_socket()
        connection.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(connection, (host, port))
        except BaseException:
            connection.close()
            raise
        return connection

    def _inside(self, make: Callable[[], T]) -> T:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _libc_call("setns", self.descriptor, CLONE_NEWNET)
            made = make()
            with contextlib.suppress(OSError):  # the thread ends anyway
                _libc_call("setns", own, CLONE_NEWNET)
            return made
        finally:
            os.close(own)

    def close(self) -> None:
        """Let go of the namespace; it ends once its processes and its sockets are gone too."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1


class InboundForwarder:
    """Relays connections to a declared server port from the device into the application's namespace.

    ``listener`` listens on the device's side; ``connect_inside`` opens a connection to the application's
    port inside its namespace (:meth:`NetworkNamespace.connect`).
    The application sees each connection come from its own loopback address.
    """

    def __init__(
        self,
        component_id: str,
        listener: socket.socket,
        connect_inside: Callable[[], Awaitable[socket.socket]],
        *,
        limits: ProxyLimits | None = None,
    ) -> None:
        self.component_id = component_id
        self._limits = limits or ProxyLimits()
        self._connect_inside = connect_inside
        self._acceptor = Acceptor(
            listener, max_connections=self._limits.max_tunnels, what=f"server port of {component_id}"
        )

    @property
    def port(self) -> int:
        return self._acceptor.port

    @property
    def active(self) -> int:
        return self._acceptor.active

    def start(self) -> None:
        self._acceptor.start(self._serve, b"")

    async def close(self) -> None:
        await self._acceptor.close()

    async def _serve(self, connection: socket.socket) -> None:
        limits = self._limits
        try:
            reader, writer = await asyncio.open_connection(sock=connection, limit=limits.relay_buffer_bytes)
        except OSError:
            connection.close()
            return
        try:
            try:
                async with asyncio.timeout(limits.connect_timeout_seconds):
                    inside = await self._connect_inside()
            except (OSError, TimeoutError) as error:
                logger.info(
                    "server port %d of %s: the application does not answer: %s",
                    self.port,
                    self.component_id,
                    error,
                )
                return
            try:
                inner = await asyncio.open_connection(sock=inside, limit=limits.relay_buffer_bytes)
            except OSError:
                inside.close()
                return
            try:
                for side in (writer, inner[1]):
                    side.transport.set_write_buffer_limits(high=limits.relay_buffer_bytes)
                await relay(
                    (reader, writer),
                    inner,
                    idle_timeout_seconds=limits.idle_timeout_seconds,
                    chunk_bytes=limits.relay_buffer_bytes,
                )
            finally:
                await close_stream(inner[1])
        finally:
            await close_stream(writer)


@dataclass
class AppNetwork:
    """One run's network: its namespace (as root), its proxy (with ``AllowedConnections``), its forwarders."""

    namespace: NetworkNamespace | None = None
    proxy: ConnectProxy | None = None
    forwarders: list[InboundForwarder] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        """The proxy variables for the application's environment; none without a proxy."""
        if self.proxy is None:
            return {}
        return dict.fromkeys(PROXY_VARIABLES, self.proxy.url())

    async def close(self) -> None:
        """Close the proxy and the forwarders (ending every tunnel) and let go of the namespace."""
        try:
            for forwarder in self.forwarders:
                await forwarder.close()
            if self.proxy is not None:
                await self.proxy.close()
        finally:
            if self.namespace is not None:
                self.namespace.close()


def _listen_on_device(port: int, backlog: int = 64) -> socket.socket:
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=backlog)
    return socket.create_server(("", port), backlog=backlog)


async def open_app_network(
    component_id: str,
    capabilities: Capabilities,
    *,
    isolate: bool,
    limits: ProxyLimits,
    resolver: Resolver | None = None,
    on_blocked: OnBlocked | None = None,
    on_allowed: OnAllowed | None = None,
) -> AppNetwork:
    """Make one run's network. ``isolate``: a namespace of its own (needs root), with the proxy inside and a
    forwarder from the device for each declared TCP server port; otherwise the proxy on a free port of
    the agent's own loopback. Raises ``OSError`` (a namespace or a port that cannot be had), leaving
    nothing open."""
    network = AppNetwork()
    try:
        if isolate:
            network.namespace = await NetworkNamespace.create()
        if capabilities.allowed_connections:
            if network.namespace is not None:
                listener = await network.namespace.listen("127.0.0.1", limits.proxy_port)
            else:
                listener = socket.create_server(("127.0.0.1", 0))
            proxy = ConnectProxy(
                component_id,
                capabilities,
                limits=limits,
                resolver=resolver,
                on_blocked=on_blocked,
                on_allowed=on_allowed,
            )
            proxy.start(listener)
            network.proxy = proxy
        if network.namespace is not None:
            namespace = network.namespace
            for port in capabilities.allowed_tcp_server_ports:
                forwarder = InboundForwarder(
                    component_id,
                    _listen_on_device(port),
                    functools.partial(namespace.connect, "127.0.0.1", port),
                    limits=limits,
                )
                forwarder.start()
                network.forwarders.append(forwarder)
    except BaseException:
        await network.close()
        raise
    return network
