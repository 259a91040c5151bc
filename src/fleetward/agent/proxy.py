"""The allow-listing proxy: how an application reaches the network, only toward its ``AllowedConnections``.

Each application with ``AllowedConnections`` gets its own :class:`ConnectProxy`, which serves HTTP
``CONNECT`` on a listening socket the agent made (inside the application's network namespace when the agent
is root, see :mod:`fleetward.agent.netns`), in the agent's own event loop. For each ``CONNECT host:port``:

1. the request head is parsed and bounded (:func:`parse_connect_request`, a pure function): a malformed
   request is answered 400, another method 405, an oversized head 431;
2. ``host:port`` must fall under an entry of the manifest's ``AllowedConnections``
   (:meth:`Capabilities.require <fleetward.agent.manifest.Capabilities.require>`, the manifest's own
   matching); if not, the answer is 403 with the reason, ``on_blocked(component_id, host, port)`` is called,
   and nothing is resolved or opened;
3. a host name is resolved by the agent (:class:`Resolver`), and the addresses are screened
   (:func:`screen_addresses`): an address that is not global (loopback, private, link-local, …) is kept
   only when the manifest names that IP itself, so a name cannot be made to point at the device's own
   services (DNS rebinding). No address left: 403 and ``on_blocked``; otherwise ``on_allowed(component_id,
   host, port)`` is called (the security baseline counts which declared destinations are used);
4. the agent connects, from its own namespace, to the screened addresses in turn (502 or 504 when none
   answers), answers ``200 Connection established`` and relays bytes both ways (:func:`relay`): bounded
   buffers with back-pressure, half-close, and an idle timeout.

At most ``max_tunnels`` connections to one proxy are open at once (the next is answered 503). Plain HTTP
proxying (``GET http://…``) is not offered: 405 says to use ``https://`` or a ``CONNECT`` tunnel, so one
client connection never carries requests to several destinations.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from fleetward.agent.manifest import AllowedConnection, Capabilities, Capability
from fleetward.agent.relay import Acceptor, close_stream, relay
from fleetward.bounds import check_positive, seconds_may_be_fractions
from fleetward.errors import (
    CapabilityNotDeclared,
    InvalidInput,
    PayloadTooLarge,
    PermissionDenied,
    TransportError,
)

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")
_REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
#: The status each refusal code is answered with.
STATUS_OF = {
    "proxy_request_malformed": 400,
    "proxy_method_not_allowed": 405,
    "proxy_request_too_large": 431,
    "proxy_request_timeout": 408,
    "capability_not_declared": 403,
    "proxy_unresolvable": 502,
    "proxy_upstream_unreachable": 502,
    "proxy_upstream_timeout": 504,
    "proxy_busy": 503,
}


@dataclass(frozen=True)
class ProxyLimits:
    """Bounds on one application's proxy. Every one is a configuration value with its unit in its name.

    ``proxy_port`` is the port the proxy listens on inside the application's namespace; when the agent is
    not root the proxy shares the agent's namespace and takes a free port instead.
    """

    proxy_port: int = 3128
    max_tunnels: int = 32
    max_request_head_bytes: int = 8 * 1024
    max_request_header_lines: int = 64
    request_timeout_seconds: float = 10.0
    connect_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 300.0
    relay_buffer_bytes: int = 64 * 1024
    max_addresses_tried: int = 4

    def __post_init__(self) -> None:
        check_positive(self, "proxy limit", fractional=seconds_may_be_fractions)
        if self.proxy_port > 65_535:
            raise ValueError("the proxy port is a number from 1 to 65535")


# --- the pure core -------------------------------------------------------------------------------------


def _malformed(message: str) -> InvalidInput:
    return InvalidInput(message, code="proxy_request_malformed")


def parse_connect_request(head: bytes, limits: ProxyLimits | None = None) -> AllowedConnection:
    """The destination of a ``CONNECT`` request, from its head (request line, headers, blank line).

    Raises :class:`InvalidInput` (``proxy_request_malformed``, or ``proxy_method_not_allowed`` for another
    method) or :class:`PayloadTooLarge` (``proxy_request_too_large``), saying what is wrong. The headers are
    checked for form and count, and otherwise ignored.
    """
    limits = limits or ProxyLimits()
    if len(head) > limits.max_request_head_bytes:
        raise PayloadTooLarge(
            f"the request head is more than {limits.max_request_head_bytes} bytes",
            code="proxy_request_too_large",
        )
    if not head.endswith(b"\r\n\r\n"):
        raise _malformed("the request head does not end with an empty line (CRLF CRLF)")
    try:
        text = head[:-4].decode("ascii")
    except UnicodeDecodeError:
        raise _malformed("the request head is not ASCII") from None
    lines = text.split("\r\n")
    if any("\r" in line or "\n" in line or "\x00" in line for line in lines):
        raise _malformed("a line ends with a bare CR or LF, or holds a NUL")
    if len(lines) - 1 > limits.max_request_header_lines:
        raise PayloadTooLarge(
            f"the request has more than {limits.max_request_header_lines} header lines",
            code="proxy_request_too_large",
        )
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise _malformed(f"{line[:64]!r} is not a header line (name: value)")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _malformed(f"{lines[0][:80]!r} is not a request line (METHOD target HTTP/1.1)")
    method, target, version = parts
    if version not in _VERSIONS:
        raise _malformed(f"{version[:16]!r} is not HTTP/1.1 or HTTP/1.0")
    if not _TOKEN.fullmatch(method):
        raise _malformed(f"{method[:16]!r} is not a method")
    if method != "CONNECT":
        raise InvalidInput(
            f"this proxy only opens tunnels (CONNECT host:port), not {method[:16]}: use https:// or a "
            "CONNECT tunnel",
            code="proxy_method_not_allowed",
        )
    try:
        destination = AllowedConnection.parse(target)
    except ValueError as error:
        raise _malformed(f"{target[:80]!r} is not host:port: {error}") from None
    if destination.wildcard:
        raise _malformed("a tunnel goes to one host, not a wildcard")
    if destination.port is None:
        raise _malformed(f"{target[:80]!r} has no port (CONNECT host:port, or [IPv6]:port)")
    return destination


def _plain(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast


def screen_addresses(
    capabilities: Capabilities, destination: AllowedConnection, addresses: Sequence[IPAddress]
) -> tuple[IPAddress, ...]:
    """The addresses a declared host name may be reached at: each global one, and each other one
    (loopback, private, link-local, …) only when the manifest names that IP with that port.

    An IP destination is not screened (the manifest named it). Raises :class:`CapabilityNotDeclared`
    when no address is left, naming the first one refused.
    """
    port = destination.port
    if destination.kind != "dns":
        return (ipaddress.ip_address(destination.host),)
    kept: list[IPAddress] = []
    refused: list[IPAddress] = []
    for address in dict.fromkeys(_plain(address) for address in addresses):
        if _public(address):
            kept.append(address)
            continue
        named = AllowedConnection(
            host=address.compressed, kind="ipv4" if address.version == 4 else "ipv6", port=port
        )
        if any(entry.allows(named) for entry in capabilities.allowed_connections):
            kept.append(address)
        else:
            refused.append(address)
    if kept:
        return tuple(kept)
    if not refused:
        raise CapabilityNotDeclared(
            f"{destination.host} resolves to no address",
            capability="AllowedConnections",
            detail=str(destination),
        )
    first = refused[0]
    shown = f"[{first}]:{port}" if first.version == 6 else f"{first}:{port}"
    raise CapabilityNotDeclared(
        f"{destination.host} resolves to {first}, which is not a public address; name {shown} in "
        "AllowedConnections to allow it",
        capability=Capability.ALLOWED_CONNECTIONS.value,
        detail=str(destination),
    )


def render_answer(status: int, code: str = "", reason: str = "") -> bytes:
    """An HTTP/1.1 answer of the proxy: ``200 Connection established``, or a refusal saying why."""
    if status == 200:
        return b"HTTP/1.1 200 Connection established\r\n\r\n"
    body = f"{code}: {reason}\n".encode("ascii", "replace")
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Fleetward-Refusal: {code}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


# --- the interfaces ------------------------------------------------------------------------------------


class Resolver(Protocol):
    """Turns a host name into addresses (may raise ``OSError``); the proxy connects to those, not the name."""

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]: ...


class SystemResolver:
    """The system's resolver (``getaddrinfo``), as the agent's own namespace sees it."""

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        return [ipaddress.ip_address(entry[4][0]) for entry in found]


class StaticResolver:
    """A fixed table of names and addresses: the fake the tests inject (and a pinned table on a device)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {
            name.lower(): [ipaddress.ip_address(text) for text in found] for name, found in table.items()
        }

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        try:
            return self._table[host.lower()]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the table") from None


class OnBlocked(Protocol):
    """Told of every ``CONNECT`` refused because the manifest does not allow it (the security baseline)."""

    def __call__(self, component_id: str, host: str, port: int) -> None: ...


def log_blocked(component_id: str, host: str, port: int) -> None:
    """The default :class:`OnBlocked`: a warning in the agent's log."""
    logger.warning("application %s was refused a connection to %s port %d", component_id, host, port)


class OnAllowed(Protocol):
    """Told of every ``CONNECT`` the manifest allows, before connecting (the security baseline)."""

    def __call__(self, component_id: str, host: str, port: int) -> None: ...


def ignore_allowed(component_id: str, host: str, port: int) -> None:
    """The default :class:`OnAllowed`: nothing to do."""


class ConnectProxy:
    """One application's allow-listing ``CONNECT`` proxy, served on a listening socket the caller made.

    :meth:`start` serves on the socket; :meth:`close` (or leaving ``async with proxy``) ends it all.
    """

    def __init__(
        self,
        component_id: str,
        capabilities: Capabilities,
        *,
        limits: ProxyLimits | None = None,
        resolver: Resolver | None = None,
        on_blocked: OnBlocked | None = None,
        on_allowed: OnAllowed | None = None,
    ) -> None:
        self.component_id = component_id
        self._capabilities = capabilities
        self._limits = limits or ProxyLimits()
        self._resolver = resolver or SystemResolver()
        self._on_blocked = on_blocked or log_blocked
        self._on_allowed = on_allowed or ignore_allowed
        self._acceptor: Acceptor | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on (in the namespace its listening socket belongs to)."""
        if self._acceptor is None:
            raise RuntimeError("the proxy is not started")
        return self._acceptor.port

    @property
    def active(self) -> int:
        """Connections to the proxy open now."""
        return self._acceptor.active if self._acceptor else 0

    def url(self) -> str:
        """What ``HTTPS_PROXY`` and the other proxy variables are set to."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, listener: socket.socket) -> None:
        """Serve on ``listener`` (a listening TCP socket, which the proxy now owns and closes)."""
        if self._acceptor is not None:
            raise RuntimeError("the proxy is started already")
        self._acceptor = Acceptor(
            listener, max_connections=self._limits.max_tunnels, what=f"proxy of {self.component_id}"
        )
        busy = render_answer(
            503,
            "proxy_busy",
            f"at most {self._limits.max_tunnels} connections through the proxy at once",
        )
        self._acceptor.start(self._serve, busy)

    async def close(self) -> None:
        """Stop listening, end every tunnel, and wait for each."""
        if self._acceptor is not None:
            await self._acceptor.close()

    async def __aenter__(self) -> ConnectProxy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, connection: socket.socket) -> None:
        limits = self._limits
        try:
            reader, writer = await asyncio.open_connection(
                sock=connection, limit=limits.max_request_head_bytes
            )
        except OSError:
            connection.close()
            return
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            writer.transport.set_write_buffer_limits(high=limits.relay_buffer_bytes)
            try:
                upstream = await self._open(reader)
            except (InvalidInput, PermissionDenied, TransportError) as refusal:
                writer.write(render_answer(STATUS_OF[refusal.code], refusal.code, refusal.message))
                await writer.drain()
                return
            writer.write(render_answer(200))
            await writer.drain()
            await relay(
                (reader, writer),
                upstream,
                idle_timeout_seconds=limits.idle_timeout_seconds,
                chunk_bytes=limits.relay_buffer_bytes,
            )
        except OSError:
            return  # the application went away: nothing to answer
        finally:
            if upstream is not None:
                await close_stream(upstream[1])
            await close_stream(writer)

    async def _open(self, reader: asyncio.StreamReader) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Read the request, check it, resolve, screen and connect. A refusal raises the error to answer:
        :class:`InvalidInput` (a bad request), :class:`CapabilityNotDeclared` (not allowed, after telling
        ``on_blocked``) or :class:`TransportError` (no name, no answer)."""
        limits = self._limits
        try:
            async with asyncio.timeout(limits.request_timeout_seconds):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise InvalidInput("no complete request in time", code="proxy_request_timeout") from None
        except asyncio.LimitOverrunError:
            raise PayloadTooLarge(
                f"the request head is more than {limits.max_request_head_bytes} bytes",
                code="proxy_request_too_large",
            ) from None
        except asyncio.IncompleteReadError:
            raise _malformed("the connection ended before the request did") from None
        destination = parse_connect_request(head, limits)
        port = destination.port
        assert port is not None  # parse_connect_request requires one
        try:
            self._capabilities.require(Capability.ALLOWED_CONNECTIONS, str(destination))
            addresses = screen_addresses(self._capabilities, destination, await self._resolve(destination))
        except CapabilityNotDeclared:
            self._on_blocked(self.component_id, destination.host, port)
            raise
        self._on_allowed(self.component_id, destination.host, port)
        return await self._connect(destination, addresses[: limits.max_addresses_tried])

    async def _resolve(self, destination: AllowedConnection) -> Sequence[IPAddress]:
        if destination.kind != "dns":
            return ()
        assert destination.port is not None
        try:
            async with asyncio.timeout(self._limits.connect_timeout_seconds):
                return await self._resolver.resolve(destination.host, destination.port)
        except TimeoutError:
            raise TransportError(
                f"{destination.host} was not resolved in time", code="proxy_unresolvable"
            ) from None
        except OSError as error:
            raise TransportError(
                f"{destination.host} cannot be resolved: {error}", code="proxy_unresolvable"
            ) from None

    async def _connect(
        self, destination: AllowedConnection, addresses: Sequence[IPAddress]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        limits = self._limits
        failures: list[str] = []
        timeouts = 0
        for address in addresses:
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            try:
                async with asyncio.timeout(limits.connect_timeout_seconds):
                    await loop.sock_connect(upstream, (address.compressed, destination.port))
                reader, writer = await asyncio.open_connection(sock=upstream, limit=limits.relay_buffer_bytes)
            except TimeoutError:
                upstream.close()
                timeouts += 1
                failures.append(f"{address}: no answer in {limits.connect_timeout_seconds:g} s")
                continue
            except OSError as error:
                upstream.close()
                failures.append(f"{address}: {error.strerror or error}")
                continue
            writer.transport.set_write_buffer_limits(high=limits.relay_buffer_bytes)
            return reader, writer
        code = "proxy_upstream_timeout" if timeouts == len(failures) else "proxy_upstream_unreachable"
        raise TransportError(f"cannot connect to {destination}: {'; '.join(failures)}", code=code)
