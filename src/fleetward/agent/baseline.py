"""The device's security baseline, read from the kernel: sockets from /proc/net, traffic from /proc/net/dev.

The parsers are pure (text in, records out); :class:`BaselineCollector` reads the files under a ``proc``
root (``/proc`` on a device, a directory of fixtures in tests), keeps the counters of the previous look
to report traffic per interval, and counts the destinations seen in established connections between
reports. Connections the agent's proxy blocks are handed to it with :meth:`BaselineCollector.blocked`, and
those it lets through with :meth:`BaselineCollector.allowed`.

What /proc shows is the agent's network namespace: run the agent in the device's own namespace.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fleetward.errors import InvalidInput
from fleetward.wire.baseline import (
    MAX_ALLOWED,
    MAX_BLOCKED,
    MAX_CONNECTIONS,
    MAX_DESTINATIONS,
    MAX_LISTENING,
    AllowedConnection,
    BlockedConnection,
    Connection,
    Destination,
    ListeningPort,
    SecurityBaseline,
    Traffic,
)

T = TypeVar("T")

#: /proc/net/tcp states (include/net/tcp_states.h)
_TCP_ESTABLISHED = "01"
_TCP_LISTEN = "0A"
#: a UDP socket with no peer shows as TCP_CLOSE (07)
_UDP_UNCONNECTED = "07"
#: /proc/net files are a few hundred bytes per socket: refuse anything absurdly large rather than read it
MAX_PROC_FILE_BYTES = 16 * 1024 * 1024


def _unreadable(message: str) -> InvalidInput:
    return InvalidInput(message, code="baseline_unreadable")


def decode_endpoint(text: str) -> tuple[str, int]:
    """``0100007F:0CEA`` → ``("127.0.0.1", 3306)``: the kernel prints each 32-bit word in host order."""
    address_hex, _, port_hex = text.partition(":")
    try:
        port = int(port_hex, 16)
        if len(address_hex) == 8:
            raw = bytes.fromhex(address_hex)[::-1]
        elif len(address_hex) == 32:
            words = bytes.fromhex(address_hex)
            raw = b"".join(words[i : i + 4][::-1] for i in range(0, 16, 4))
        else:
            raise ValueError(address_hex)
    except ValueError:
        raise _unreadable(f"not a /proc/net endpoint: {text[:64]!r}") from None
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), port


def _rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines()[1:]:  # the first line names the columns
        fields = line.split()
        if len(fields) >= 4:
            yield fields


def parse_sockets(text: str, protocol: str) -> tuple[list[ListeningPort], list[Connection]]:
    """The listening sockets and the established connections of one /proc/net/{tcp,tcp6,udp,udp6} file."""
    listening: list[ListeningPort] = []
    established: list[Connection] = []
    for fields in _rows(text):
        local, remote, state = fields[1], fields[2], fields[3]
        local_address, local_port = decode_endpoint(local)
        if protocol == "tcp" and state == _TCP_LISTEN:
            listening.append(ListeningPort(protocol="tcp", address=local_address, port=local_port))
        elif protocol == "udp" and state == _UDP_UNCONNECTED:
            listening.append(ListeningPort(protocol="udp", address=local_address, port=local_port))
        elif protocol == "tcp" and state == _TCP_ESTABLISHED:
            remote_address, remote_port = decode_endpoint(remote)
            established.append(
                Connection(
                    local_address=local_address,
                    local_port=local_port,
                    remote_address=remote_address,
                    remote_port=remote_port,
                )
            )
    return listening, established


def parse_interfaces(text: str) -> dict[str, Traffic]:
    """Each interface's counters in /proc/net/dev (bytes and packets, received and sent)."""
    interfaces: dict[str, Traffic] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, separator, counters = line.partition(":")
        fields = counters.split()
        if not separator or len(fields) < 10:
            raise _unreadable(f"not a /proc/net/dev line: {line[:64]!r}")
        try:
            interfaces[name.strip()] = Traffic(
                bytes_in=int(fields[0]),
                packets_in=int(fields[1]),
                bytes_out=int(fields[8]),
                packets_out=int(fields[9]),
            )
        except ValueError:
            raise InvalidInput(
                f"not a /proc/net/dev line: {line[:64]!r}", code="baseline_unreadable"
            ) from None
    return interfaces


def traffic_between(before: dict[str, Traffic], after: dict[str, Traffic]) -> Traffic:
    """What moved between two looks, on every interface but loopback; a counter that went back (an
    interface that came and went, a wrap) counts from zero."""

    def moved(now: int, then: int) -> int:
        return now - then if now >= then else now

    totals = Traffic()
    for name, now in after.items():
        if name == "lo":
            continue
        then = before.get(name, Traffic())
        totals = Traffic(
            bytes_in=totals.bytes_in + moved(now.bytes_in, then.bytes_in),
            bytes_out=totals.bytes_out + moved(now.bytes_out, then.bytes_out),
            packets_in=totals.packets_in + moved(now.packets_in, then.packets_in),
            packets_out=totals.packets_out + moved(now.packets_out, then.packets_out),
        )
    return totals


def _bounded(items: list[T], limit: int) -> tuple[tuple[T, ...], int]:
    return tuple(items[:limit]), max(0, len(items) - limit)


@dataclass
class BaselineCollector:
    """Looks at the kernel's view of the network and makes one :class:`SecurityBaseline` per interval."""

    proc: Path = Path("/proc")
    _interfaces: dict[str, Traffic] = field(default_factory=dict)
    _since: dt.datetime | None = None
    _destinations: Counter[tuple[str, int]] = field(default_factory=Counter)
    _blocked: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    _allowed: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def _read(self, name: str) -> str:
        path = self.proc / "net" / name
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_PROC_FILE_BYTES + 1)
        except FileNotFoundError:
            return ""  # no IPv6 in this kernel, say
        except OSError as error:
            raise _unreadable(f"cannot read {path}: {error.strerror}") from None
        if len(data) > MAX_PROC_FILE_BYTES:
            raise InvalidInput(
                f"{path} is larger than {MAX_PROC_FILE_BYTES} bytes", code="baseline_unreadable"
            )
        return data.decode("ascii", errors="replace")

    def sockets(self) -> tuple[list[ListeningPort], list[Connection]]:
        listening: list[ListeningPort] = []
        established: list[Connection] = []
        for name, protocol in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
            found, connected = parse_sockets(self._read(name), protocol)
            listening.extend(found)
            established.extend(connected)
        return listening, established

    def sample(self) -> None:
        """Note the destinations of the connections open now (call it more often than :meth:`report`)."""
        _listening, established = self.sockets()
        for connection in established:
            if not ipaddress.ip_address(connection.remote_address).is_loopback:
                self._destinations[(connection.remote_address, connection.remote_port)] += 1

    def blocked(self, component_id: str, host: str, port: int) -> None:
        """The proxy refused ``component_id`` a connection to ``host:port``."""
        self._blocked[(component_id, host, port)] += 1

    def allowed(self, component_id: str, host: str, port: int) -> None:
        """The proxy let ``component_id`` connect to ``host:port`` (its manifest declares it)."""
        self._allowed[(component_id, host, port)] += 1

    def report(self, now: dt.datetime) -> SecurityBaseline:
        """The baseline since the last report (the first one covers the time since the collector began)."""
        self.sample()
        listening, established = self.sockets()
        interfaces = parse_interfaces(self._read("dev"))
        traffic = traffic_between(self._interfaces, interfaces) if self._since else Traffic()
        interval = (now - self._since).total_seconds() if self._since else 1.0
        destinations = [
            Destination(address=address, port=port, times_seen=count)
            for (address, port), count in self._destinations.most_common()
        ]
        blocked = [
            BlockedConnection(component_id=component, host=host, port=port, count=count)
            for (component, host, port), count in self._blocked.most_common()
        ]
        allowed = [
            AllowedConnection(component_id=component, host=host, port=port, count=count)
            for (component, host, port), count in self._allowed.most_common()
        ]
        unique_listening = sorted(set(listening), key=lambda item: (item.protocol, item.port, item.address))
        listening_kept, over_listening = _bounded(unique_listening, MAX_LISTENING)
        established_kept, over_established = _bounded(established, MAX_CONNECTIONS)
        destinations_kept, over_destinations = _bounded(destinations, MAX_DESTINATIONS)
        blocked_kept, over_blocked = _bounded(blocked, MAX_BLOCKED)
        allowed_kept, over_allowed = _bounded(allowed, MAX_ALLOWED)
        baseline = SecurityBaseline(
            collected_at=now,
            interval_seconds=max(interval, 0.001),
            listening=listening_kept,
            established=established_kept,
            destinations=destinations_kept,
            blocked=blocked_kept,
            allowed=allowed_kept,
            traffic=traffic,
            truncated=over_listening + over_established + over_destinations + over_blocked + over_allowed,
        )
        self._interfaces, self._since = interfaces, now
        self._destinations.clear()
        self._blocked.clear()
        self._allowed.clear()
        return baseline
