"""The security baseline a device reports: what it listens on, whom it talks to, what was blocked, traffic.

The metric set is the device side of AWS IoT Device Defender's: listening TCP and UDP ports, established
TCP connections, the remote addresses contacted, and bytes and packets in and out; plus the connections
the agent's allow-listing proxy blocked, and those it let through (``allowed``, which older agents leave
empty). The agent sends one report per interval as telemetry with the
property ``fleetward-report=security-baseline`` (:data:`REPORT_PROPERTY`); the monitor judges it.
Every list is bounded, and a report says when it had to leave entries out (``truncated``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

#: The telemetry property that marks a message as one of the agent's own reports, and its values.
REPORT_PROPERTY = "fleetward-report"
BASELINE_REPORT = "security-baseline"

MAX_LISTENING = 256
MAX_CONNECTIONS = 1024
MAX_DESTINATIONS = 512
MAX_BLOCKED = 256
MAX_ALLOWED = 256
MAX_BASELINE_BYTES = 256 * 1024

Port = Annotated[int, Field(ge=0, le=65535)]
Counter = Annotated[int, Field(ge=0, le=2**63 - 1)]


def _check_address(value: str) -> str:
    return str(ipaddress.ip_address(value))  # canonical text; ValueError names what was wrong


Address = Annotated[str, StringConstraints(max_length=45), AfterValidator(_check_address)]
HostName = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$|^[0-9a-fA-F:.]{2,45}$", max_length=253
    ),
]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListeningPort(_Record):
    """A socket waiting for others: TCP in LISTEN, or a bound UDP socket with no peer."""

    protocol: Literal["tcp", "udp"]
    address: Address
    port: Port


class Connection(_Record):
    """An established TCP connection."""

    local_address: Address
    local_port: Port
    remote_address: Address
    remote_port: Port


class Destination(_Record):
    """A remote address the device was seen talking to during the interval, and how often."""

    address: Address
    port: Port
    times_seen: Counter


class BlockedConnection(_Record):
    """A connection the agent's proxy refused: the application did not declare the destination."""

    component_id: Annotated[str, StringConstraints(max_length=64)]
    host: HostName
    port: Port
    count: Counter


class AllowedConnection(_Record):
    """A destination the agent's proxy let an application reach (its manifest declares it), and how often:
    what the audit compares with what the manifest declares."""

    component_id: Annotated[str, StringConstraints(max_length=64)]
    host: HostName
    port: Port
    count: Counter


class Traffic(_Record):
    """Totals over the interval, on every interface but loopback."""

    bytes_in: Counter = 0
    bytes_out: Counter = 0
    packets_in: Counter = 0
    packets_out: Counter = 0


class SecurityBaseline(_Record):
    format: Literal["fleetward-baseline-v1"] = "fleetward-baseline-v1"
    collected_at: dt.datetime
    interval_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
    listening: tuple[ListeningPort, ...] = Field(default=(), max_length=MAX_LISTENING)
    established: tuple[Connection, ...] = Field(default=(), max_length=MAX_CONNECTIONS)
    destinations: tuple[Destination, ...] = Field(default=(), max_length=MAX_DESTINATIONS)
    blocked: tuple[BlockedConnection, ...] = Field(default=(), max_length=MAX_BLOCKED)
    allowed: tuple[AllowedConnection, ...] = Field(default=(), max_length=MAX_ALLOWED)
    traffic: Traffic = Traffic()
    #: entries left out because a list reached its bound
    truncated: Counter = 0
