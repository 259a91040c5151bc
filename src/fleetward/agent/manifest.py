"""The application manifest: what an application is and what it may use. A pure core: bytes in, typed record.

The format is Azure Sphere's ``app_manifest.json``, so an application written for it keeps its manifest::

    {
      "SchemaVersion": 1,
      "Name": "panel-monitor",
      "ComponentId": "2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21",
      "EntryPoint": "/bin/app",
      "CmdArgs": ["--interval", "10"],
      "Capabilities": {
        "AllowedConnections": ["hub.example.com:8883", "10.0.0.5"],
        "Gpio": [8, 12],
        "MutableStorage": {"SizeKB": 64}
      },
      "ApplicationType": "Default"
    }

Nothing is granted by default: a capability the manifest does not list is refused. A field or capability
fleetward does not know is refused too, naming it (an Azure Sphere capability such as ``WifiConfig`` that
fleetward does not grant is refused rather than silently ignored). Every list, text and number has a bound
(:class:`ManifestLimits`). :meth:`Capabilities.require` is how the agent checks a request of an application
against its manifest: it raises :class:`~fleetward.errors.CapabilityNotDeclared` naming exactly what was
not declared.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from fleetward.bounds import check_positive
from fleetward.errors import CapabilityNotDeclared, InvalidInput, PayloadTooLarge

SCHEMA_VERSION = 1
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._ -]*[A-Za-z0-9._-])?")
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_PERIPHERAL = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$.:-]*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")

Peripheral = int | str


class Capability(enum.StrEnum):
    """The capabilities fleetward knows, by their manifest names."""

    ALLOWED_CONNECTIONS = "AllowedConnections"
    ALLOWED_TCP_SERVER_PORTS = "AllowedTcpServerPorts"
    ALLOWED_UDP_SERVER_PORTS = "AllowedUdpServerPorts"
    GPIO = "Gpio"
    UART = "Uart"
    I2C_MASTER = "I2cMaster"
    SPI_MASTER = "SpiMaster"
    ADC = "Adc"
    PWM = "Pwm"
    MUTABLE_STORAGE = "MutableStorage"
    DEVICE_AUTHENTICATION = "DeviceAuthentication"
    SOFTWARE_UPDATE_DEFERRAL = "SoftwareUpdateDeferral"
    SYSTEM_EVENT_NOTIFICATIONS = "SystemEventNotifications"
    POWER_CONTROLS = "PowerControls"


class PowerControl(enum.StrEnum):
    FORCE_POWER_DOWN = "ForcePowerDown"
    FORCE_REBOOT = "ForceReboot"
    SET_POWER_PROFILE = "SetPowerProfile"


_PERIPHERAL_CAPABILITIES = (
    Capability.GPIO,
    Capability.UART,
    Capability.I2C_MASTER,
    Capability.SPI_MASTER,
    Capability.ADC,
    Capability.PWM,
)
_TOP_LEVEL = (
    "SchemaVersion",
    "Name",
    "ComponentId",
    "EntryPoint",
    "CmdArgs",
    "Capabilities",
    "ApplicationType",
)


@dataclass(frozen=True)
class ManifestLimits:
    """Bounds on a manifest. Every one is a configuration value with its unit in its name."""

    max_manifest_bytes: int = 64 * 1024
    max_name_chars: int = 128
    max_entry_point_chars: int = 255
    max_entry_point_depth: int = 16
    max_cmd_args: int = 64
    max_cmd_arg_chars: int = 1024
    max_allowed_connections: int = 100
    max_server_ports: int = 32
    max_peripherals: int = 64
    max_peripheral_name_chars: int = 64
    max_peripheral_index: int = 65_535
    max_mutable_storage_kb: int = 64 * 1024

    def __post_init__(self) -> None:
        check_positive(self, "manifest limit")


@dataclass(frozen=True)
class AllowedConnection:
    """One entry of ``AllowedConnections``: a host name (``*.`` wildcard allowed) or an IP, maybe a port."""

    host: str
    kind: Literal["dns", "ipv4", "ipv6"]
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> AllowedConnection:
        """Parse ``host``, ``host:port``, ``*.domain``, ``1.2.3.4:80``, ``::1`` or ``[::1]:443``.

        Raises ``ValueError`` saying what is wrong.
        """
        if not isinstance(text, str):
            raise TypeError("a connection is a string")
        if not 1 <= len(text) <= 261:  # a 253-character name, a colon and a five-digit port, or brackets
            raise ValueError("must be 1 to 261 characters")
        host, port = text, None
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError("an opening bracket needs a closing one: [IPv6]:port")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise ValueError("a bracketed IPv6 address must be followed by :port")
            port = _parse_port(rest[1:])
            address = _parse_ip(host)
            if address is None or address.version != 6:
                raise ValueError("only an IPv6 address goes between brackets")
            return cls(host=address.compressed, kind="ipv6", port=port)
        if text.count(":") == 1:
            host, port_text = text.split(":")
            port = _parse_port(port_text)
        address = _parse_ip(host)
        if address is not None:
            if address.version == 6 and port is not None:
                raise ValueError("write an IPv6 address with a port as [address]:port")
            return cls(host=address.compressed, kind="ipv4" if address.version == 4 else "ipv6", port=port)
        if ":" in host:
            raise ValueError("is not a host name, an IP address, or either followed by :port")
        wildcard = host.startswith("*.")
        name = _check_host_name(host[2:] if wildcard else host, wildcard=wildcard)
        return cls(host=name, kind="dns", port=port, wildcard=wildcard)

    def __str__(self) -> str:
        host = f"*.{self.host}" if self.wildcard else self.host
        if self.port is None:
            return host
        return f"[{host}]:{self.port}" if self.kind == "ipv6" else f"{host}:{self.port}"

    def allows(self, other: AllowedConnection) -> bool:
        """Whether a connection to ``other`` (one host, maybe with a port) falls under this entry."""
        if other.wildcard or self.kind != other.kind:
            return False
        if self.port is not None and other.port != self.port:
            return False
        if self.wildcard:
            return other.host.endswith("." + self.host)
        return other.host == self.host


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65_535:
        raise ValueError(f"port {text[:8]!r} is not a number from 1 to 65535")
    return int(text)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError("an IPv6 address with a zone (%…) is not allowed")
    if address.is_unspecified:
        raise ValueError("the unspecified address is not a connection")
    return address


def _check_host_name(host: str, *, wildcard: bool) -> str:
    name = host.lower()
    if not name or len(name) > 253:
        raise ValueError("a host name is 1 to 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _DNS_LABEL.fullmatch(label):
            raise ValueError(
                f"label {label[:63]!r} is not 1 to 63 letters, digits or inner hyphens"
                + (" (a wildcard is allowed only as a leading '*.')" if "*" in label else "")
            )
    if labels[-1].isdigit():
        raise ValueError("is neither an IPv4 address nor a host name (the last label is all digits)")
    if wildcard and len(labels) < 2:
        raise ValueError("a wildcard covers a domain of at least two labels, such as *.example.com")
    return name


@dataclass(frozen=True)
class Capabilities:
    """What an application may use. The default grants nothing."""

    allowed_connections: tuple[AllowedConnection, ...] = ()
    allowed_tcp_server_ports: tuple[int, ...] = ()
    allowed_udp_server_ports: tuple[int, ...] = ()
    gpio: tuple[Peripheral, ...] = ()
    uart: tuple[Peripheral, ...] = ()
    i2c_master: tuple[Peripheral, ...] = ()
    spi_master: tuple[Peripheral, ...] = ()
    adc: tuple[Peripheral, ...] = ()
    pwm: tuple[Peripheral, ...] = ()
    mutable_storage_kb: int | None = None
    device_authentication: str | None = None
    software_update_deferral: bool = False
    system_event_notifications: bool = False
    power_controls: tuple[PowerControl, ...] = ()

    def __post_init__(self) -> None:
        for ports in (self.allowed_tcp_server_ports, self.allowed_udp_server_ports):
            if any(isinstance(port, bool) or not 1 <= port <= 65_535 for port in ports):
                raise ValueError("a server port is a number from 1 to 65535")
        if self.mutable_storage_kb is not None and self.mutable_storage_kb <= 0:
            raise ValueError("MutableStorage SizeKB must be positive")

    @property
    def mutable_storage_bytes(self) -> int:
        """The storage quota in bytes; 0 when the manifest declares no ``MutableStorage``."""
        return (self.mutable_storage_kb or 0) * 1024

    def peripherals(self, capability: Capability) -> tuple[Peripheral, ...]:
        """The declared entries of a peripheral capability (``Gpio``, ``Uart``, …)."""
        if capability not in _PERIPHERAL_CAPABILITIES:
            raise ValueError(f"{capability} is not a peripheral capability")
        declared: tuple[Peripheral, ...] = getattr(self, _ATTRIBUTE[capability])
        return declared

    def declared(self) -> tuple[Capability, ...]:
        """The capabilities this record grants, in manifest order."""
        return tuple(
            capability for capability in Capability if _granted(getattr(self, _ATTRIBUTE[capability]))
        )

    def require(self, capability: Capability | str, detail: str | int | None = None) -> None:
        """Raise :class:`CapabilityNotDeclared` unless the manifest declares ``capability`` (and ``detail``).

        ``detail`` narrows the question: a host or ``host:port`` for ``AllowedConnections``, a port for the
        server ports, a pin or peripheral name for ``Gpio`` and the other peripherals, a size in KB for
        ``MutableStorage``, a tenant id for ``DeviceAuthentication``, a control for ``PowerControls``.
        The yes-or-no capabilities take no detail.
        """
        try:
            capability = Capability(capability)
        except ValueError:
            raise CapabilityNotDeclared(
                f"{str(capability)[:64]!r} is not a capability a manifest can declare",
                capability=str(capability)[:64],
                detail=detail,
            ) from None
        value = getattr(self, _ATTRIBUTE[capability])
        if detail is None:
            if not _granted(value):
                raise _not_declared(capability, None, f"the manifest does not declare {capability}")
            return
        check = _DETAIL_CHECKS.get(capability)
        if check is None:
            raise TypeError(f"{capability} is a yes-or-no capability and takes no detail")
        check(self, capability, detail)


def _granted(value: object) -> bool:
    return value is not None and value is not False and value != ()


def _not_declared(capability: Capability, detail: str | int | None, message: str) -> CapabilityNotDeclared:
    return CapabilityNotDeclared(message, capability=capability.value, detail=detail)


def _require_connection(capabilities: Capabilities, capability: Capability, detail: str | int) -> None:
    if not isinstance(detail, str):
        raise TypeError("an AllowedConnections detail is a host or host:port string")
    try:
        wanted = AllowedConnection.parse(detail)
    except ValueError as error:
        raise _not_declared(
            capability, detail, f"{detail[:261]!r} is not a host to connect to: {error}"
        ) from None
    if wanted.wildcard:
        raise _not_declared(capability, detail, "a connection goes to one host, not a wildcard")
    if not any(entry.allows(wanted) for entry in capabilities.allowed_connections):
        raise _not_declared(capability, detail, f"the manifest does not declare AllowedConnections {wanted}")


def _require_member(capabilities: Capabilities, capability: Capability, detail: str | int) -> None:
    declared: tuple[object, ...] = getattr(capabilities, _ATTRIBUTE[capability])
    if capability is Capability.POWER_CONTROLS:
        if not isinstance(detail, str):
            raise TypeError("a PowerControls detail is the name of a control")
        found = detail in {control.value for control in declared if isinstance(control, PowerControl)}
    elif capability in (Capability.ALLOWED_TCP_SERVER_PORTS, Capability.ALLOWED_UDP_SERVER_PORTS):
        if not isinstance(detail, int) or isinstance(detail, bool):
            raise TypeError(f"an {capability} detail is a port number")
        found = detail in declared
    else:
        if isinstance(detail, bool):
            raise TypeError(f"a {capability} detail is a number or a name")
        found = detail in declared
    if not found:
        raise _not_declared(capability, detail, f"the manifest does not declare {capability} {detail!r}")


def _require_storage(capabilities: Capabilities, capability: Capability, detail: str | int) -> None:
    if not isinstance(detail, int) or isinstance(detail, bool) or detail < 0:
        raise TypeError("a MutableStorage detail is a size in KB")
    declared = capabilities.mutable_storage_kb
    if declared is None:
        raise _not_declared(capability, detail, "the manifest does not declare MutableStorage")
    if detail > declared:
        raise _not_declared(
            capability, detail, f"MutableStorage of {detail} KB is more than the {declared} KB declared"
        )


def _require_tenant(capabilities: Capabilities, capability: Capability, detail: str | int) -> None:
    if not isinstance(detail, str):
        raise TypeError("a DeviceAuthentication detail is a tenant id")
    if capabilities.device_authentication is None or detail.lower() != capabilities.device_authentication:
        raise _not_declared(
            capability,
            detail,
            f"the manifest does not declare DeviceAuthentication for tenant {detail[:64]!r}",
        )


_ATTRIBUTE: Mapping[Capability, str] = {
    Capability.ALLOWED_CONNECTIONS: "allowed_connections",
    Capability.ALLOWED_TCP_SERVER_PORTS: "allowed_tcp_server_ports",
    Capability.ALLOWED_UDP_SERVER_PORTS: "allowed_udp_server_ports",
    Capability.GPIO: "gpio",
    Capability.UART: "uart",
    Capability.I2C_MASTER: "i2c_master",
    Capability.SPI_MASTER: "spi_master",
    Capability.ADC: "adc",
    Capability.PWM: "pwm",
    Capability.MUTABLE_STORAGE: "mutable_storage_kb",
    Capability.DEVICE_AUTHENTICATION: "device_authentication",
    Capability.SOFTWARE_UPDATE_DEFERRAL: "software_update_deferral",
    Capability.SYSTEM_EVENT_NOTIFICATIONS: "system_event_notifications",
    Capability.POWER_CONTROLS: "power_controls",
}
_DETAIL_CHECKS: Mapping[Capability, Callable[[Capabilities, Capability, str | int], None]] = {
    Capability.ALLOWED_CONNECTIONS: _require_connection,
    Capability.ALLOWED_TCP_SERVER_PORTS: _require_member,
    Capability.ALLOWED_UDP_SERVER_PORTS: _require_member,
    **dict.fromkeys(_PERIPHERAL_CAPABILITIES, _require_member),
    Capability.MUTABLE_STORAGE: _require_storage,
    Capability.DEVICE_AUTHENTICATION: _require_tenant,
    Capability.POWER_CONTROLS: _require_member,
}


@dataclass(frozen=True)
class Manifest:
    """A parsed, bounded application manifest. Build it with :func:`parse_manifest`."""

    name: str
    component_id: str
    entry_point: str  # relative to the package root, such as bin/app
    cmd_args: tuple[str, ...] = ()
    capabilities: Capabilities = Capabilities()
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        """The manifest as JSON, in Azure Sphere's form; :func:`parse_manifest` reads it back unchanged."""
        return json.dumps(self.to_dict(), indent=2).encode("utf-8")

    def to_dict(self) -> dict[str, object]:
        capabilities: dict[str, object] = {}
        caps = self.capabilities
        for capability in caps.declared():
            value = getattr(caps, _ATTRIBUTE[capability])
            if capability is Capability.ALLOWED_CONNECTIONS:
                capabilities[capability] = [str(entry) for entry in value]
            elif capability is Capability.MUTABLE_STORAGE:
                capabilities[capability] = {"SizeKB": value}
            elif capability is Capability.POWER_CONTROLS:
                capabilities[capability] = [control.value for control in value]
            elif isinstance(value, tuple):
                capabilities[capability] = list(value)
            else:
                capabilities[capability] = value
        return {
            "SchemaVersion": self.schema_version,
            "Name": self.name,
            "ComponentId": self.component_id,
            "EntryPoint": "/" + self.entry_point,
            "CmdArgs": list(self.cmd_args),
            "Capabilities": capabilities,
            "ApplicationType": "Default",
        }


# --- parsing -------------------------------------------------------------------------------------------


def _refuse(where: str, problem: str) -> InvalidInput:
    return InvalidInput(
        f"manifest {where}: {problem}" if where else f"manifest: {problem}", code="manifest_invalid"
    )


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _refuse(key[:64], "the key appears twice")
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise _refuse("", f"{name} is not a JSON number")


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _refuse(where, "must be a JSON object")
    return value


def _list(value: object, where: str, limit: int) -> list[object]:
    if not isinstance(value, list):
        raise _refuse(where, "must be a JSON array")
    if len(value) > limit:
        raise _refuse(where, f"lists {len(value)} entries, more than the {limit} allowed")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(where, "must be a whole number")
    if not low <= value <= high:
        raise _refuse(where, f"must be from {low} to {high}, not {value}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(where, "must be true or false")
    return value


def _text(value: object, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _refuse(where, "must be a string")
    if len(value) > limit:
        raise _refuse(where, f"is {len(value)} characters, more than the {limit} allowed")
    return value


def _guid(value: object, where: str) -> str:
    text = _text(value, where, 36)
    if not _GUID.fullmatch(text):
        raise _refuse(where, "must be a GUID such as 2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21")
    if int(text.replace("-", ""), 16) == 0:
        raise _refuse(where, "must not be the nil GUID")
    return text.lower()


def _unique(values: list[object], where: str) -> None:
    seen: list[object] = []
    for value in values:
        # compare with the type, so that the pin 1 and the name "1" are different entries
        if any(type(value) is type(other) and value == other for other in seen):
            raise _refuse(where, f"lists {value!r} twice")
        seen.append(value)


def _entry_point(value: object, limits: ManifestLimits) -> str:
    text = _text(value, "EntryPoint", limits.max_entry_point_chars)
    parts = text.removeprefix("/").split("/")
    if len(parts) > limits.max_entry_point_depth:
        raise _refuse("EntryPoint", f"is deeper than {limits.max_entry_point_depth} directories")
    for part in parts:
        if not _PATH_PART.fullmatch(part):
            raise _refuse(
                "EntryPoint",
                f"part {part[:64]!r} is not a file name (letters, digits and ._+- only, not starting with "
                "a dot or a hyphen, no empty parts)",
            )
    return "/".join(parts)


def _peripherals(value: object, where: str, limits: ManifestLimits) -> tuple[Peripheral, ...]:
    entries = _list(value, where, limits.max_peripherals)
    result: list[Peripheral] = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if isinstance(entry, str):
            name = _text(entry, at, limits.max_peripheral_name_chars)
            if not _PERIPHERAL.fullmatch(name):
                raise _refuse(at, "a peripheral name is letters, digits and _$.:- only")
            result.append(name)
        else:
            result.append(_int(entry, at, 0, limits.max_peripheral_index))
    _unique(list(result), where)
    return tuple(result)


def _ports(value: object, where: str, limits: ManifestLimits) -> tuple[int, ...]:
    entries = _list(value, where, limits.max_server_ports)
    ports = tuple(_int(entry, f"{where}[{index}]", 1, 65_535) for index, entry in enumerate(entries))
    _unique(list(ports), where)
    return ports


def _connections(value: object, limits: ManifestLimits) -> tuple[AllowedConnection, ...]:
    where = "Capabilities.AllowedConnections"
    entries = _list(value, where, limits.max_allowed_connections)
    result: list[AllowedConnection] = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        text = _text(entry, at, 261)
        try:
            result.append(AllowedConnection.parse(text))
        except ValueError as error:
            raise _refuse(at, f"{text[:64]!r} {error}") from None
    _unique(list(result), where)
    return tuple(result)


def _storage(value: object, limits: ManifestLimits) -> int:
    where = "Capabilities.MutableStorage"
    entry = _object(value, where)
    unknown = sorted(set(entry) - {"SizeKB"})
    if unknown:
        raise _refuse(where, f"unknown field {unknown[0][:64]!r} (only SizeKB)")
    if "SizeKB" not in entry:
        raise _refuse(where, "SizeKB is missing")
    return _int(entry["SizeKB"], where + ".SizeKB", 1, limits.max_mutable_storage_kb)


def _power_controls(value: object, where: str) -> tuple[PowerControl, ...]:
    entries = _list(value, where, len(PowerControl))
    result: list[PowerControl] = []
    for index, entry in enumerate(entries):
        text = _text(entry, f"{where}[{index}]", 32)
        try:
            result.append(PowerControl(text))
        except ValueError:
            known = ", ".join(control.value for control in PowerControl)
            raise _refuse(f"{where}[{index}]", f"{text!r} is not one of {known}") from None
    _unique(list(result), where)
    return tuple(result)


def _capabilities(value: object, limits: ManifestLimits) -> Capabilities:
    entries = _object(value, "Capabilities")
    known = {capability.value for capability in Capability}
    unknown = sorted(set(entries) - known)
    if unknown:
        raise _refuse(
            "Capabilities",
            f"unknown capability {unknown[0][:64]!r}: fleetward grants only {', '.join(sorted(known))}",
        )
    values: dict[str, object] = {}
    for name, entry in entries.items():
        capability = Capability(name)
        where = f"Capabilities.{name}"
        if capability is Capability.ALLOWED_CONNECTIONS:
            values[_ATTRIBUTE[capability]] = _connections(entry, limits)
        elif capability in (Capability.ALLOWED_TCP_SERVER_PORTS, Capability.ALLOWED_UDP_SERVER_PORTS):
            values[_ATTRIBUTE[capability]] = _ports(entry, where, limits)
        elif capability in _PERIPHERAL_CAPABILITIES:
            values[_ATTRIBUTE[capability]] = _peripherals(entry, where, limits)
        elif capability is Capability.MUTABLE_STORAGE:
            values[_ATTRIBUTE[capability]] = _storage(entry, limits)
        elif capability is Capability.DEVICE_AUTHENTICATION:
            values[_ATTRIBUTE[capability]] = _guid(entry, where)
        elif capability is Capability.POWER_CONTROLS:
            values[_ATTRIBUTE[capability]] = _power_controls(entry, where)
        else:
            values[_ATTRIBUTE[capability]] = _bool(entry, where)
    return Capabilities(**values)  # type: ignore[arg-type]


def parse_manifest(data: bytes, limits: ManifestLimits | None = None) -> Manifest:
    """Parse and bound a manifest, or raise :class:`InvalidInput` (code ``manifest_invalid``) saying why.

    A manifest larger than ``max_manifest_bytes`` raises :class:`PayloadTooLarge` (``manifest_too_large``).
    """
    limits = limits or ManifestLimits()
    if not isinstance(data, bytes):
        raise TypeError(f"a manifest is bytes, not {type(data).__name__}")
    if len(data) > limits.max_manifest_bytes:
        raise PayloadTooLarge(
            f"the manifest is {len(data)} bytes, more than the {limits.max_manifest_bytes} allowed",
            code="manifest_too_large",
        )
    try:
        document = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
        )
    except UnicodeDecodeError:
        raise _refuse("", "is not UTF-8") from None
    except RecursionError:
        raise _refuse("", "is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError, and integers too long to convert
        raise _refuse("", f"is not valid JSON ({str(error)[:120]})") from None
    top = _object(document, "")
    unknown = sorted(set(top) - set(_TOP_LEVEL))
    if unknown:
        raise _refuse("", f"unknown field {unknown[0][:64]!r}: a manifest has only {', '.join(_TOP_LEVEL)}")
    for required in ("SchemaVersion", "Name", "ComponentId", "EntryPoint"):
        if required not in top:
            raise _refuse("", f"{required} is missing")
    schema_version = _int(top["SchemaVersion"], "SchemaVersion", SCHEMA_VERSION, SCHEMA_VERSION)
    name = _text(top["Name"], "Name", limits.max_name_chars)
    if not _NAME.fullmatch(name):
        raise _refuse("Name", "is letters, digits, spaces and ._- only, starting with a letter or digit")
    if "ApplicationType" in top and top["ApplicationType"] != "Default":
        raise _refuse("ApplicationType", "only Default is supported (fleetward has no debugger applications)")
    arguments = _list(top.get("CmdArgs", []), "CmdArgs", limits.max_cmd_args)
    cmd_args: list[str] = []
    for index, argument in enumerate(arguments):
        text = _text(argument, f"CmdArgs[{index}]", limits.max_cmd_arg_chars)
        if "\x00" in text:
            raise _refuse(f"CmdArgs[{index}]", "must not contain a NUL character")
        cmd_args.append(text)
    return Manifest(
        schema_version=schema_version,
        name=name,
        component_id=_guid(top["ComponentId"], "ComponentId"),
        entry_point=_entry_point(top["EntryPoint"], limits),
        cmd_args=tuple(cmd_args),
        capabilities=_capabilities(top.get("Capabilities", {}), limits),
    )
