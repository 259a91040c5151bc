"""The application manifest, a pure core: nothing granted by default, every field bounded, unknowns refused.

Bad manifests are a table; the parser and ``Capabilities.require`` have Hypothesis properties.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetward.agent.manifest import (
    AllowedConnection,
    Capabilities,
    Capability,
    Manifest,
    ManifestLimits,
    PowerControl,
    parse_manifest,
)
from fleetward.errors import CapabilityNotDeclared, InvalidInput, PayloadTooLarge, PermissionDenied

COMPONENT = "2f1c6b0e-7a52-4d9b-9c1e-5b8f0a3d6e21"
TENANT = "77304f1f-9530-4157-8598-30bc1f3d66f0"

AZURE_SPHERE_MANIFEST = {
    "SchemaVersion": 1,
    "Name": "Mt3620Blink",
    "ComponentId": "1689D8B2-C835-2E27-27AD-E894D6D15FA9",
    "EntryPoint": "/bin/app",
    "CmdArgs": [],
    "Capabilities": {
        "Gpio": [8, 12, "$SAMPLE_LED"],
        "Uart": ["ISU0"],
        "I2cMaster": ["ISU2"],
        "SpiMaster": ["ISU1"],
        "Adc": ["ADC-CONTROLLER-0"],
        "Pwm": ["PWM-CONTROLLER-0"],
        "AllowedConnections": [
            "global.azure-devices-provisioning.net",
            "*.azure-devices.net",
            "10.0.0.5:502",
        ],
        "AllowedTcpServerPorts": [8080],
        "AllowedUdpServerPorts": [1024, 50000],
        "MutableStorage": {"SizeKB": 64},
        "DeviceAuthentication": TENANT.upper(),
        "SoftwareUpdateDeferral": True,
        "SystemEventNotifications": True,
        "PowerControls": ["ForceReboot", "SetPowerProfile"],
    },
    "ApplicationType": "Default",
}


def encode(document: object) -> bytes:
    return json.dumps(document).encode()


def with_change(change: Callable[[dict[str, Any]], None]) -> bytes:
    document = copy.deepcopy(AZURE_SPHERE_MANIFEST)
    change(document)
    return encode(document)


def set_capability(name: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda document: document["Capabilities"].__setitem__(name, value)


def set_field(name: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda document: document.__setitem__(name, value)


def drop_field(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda document: document.pop(name)


# --- the good manifest -------------------------------------------------------------------------------------


def test_an_azure_sphere_manifest_parses_into_typed_capabilities() -> None:
    manifest = parse_manifest(encode(AZURE_SPHERE_MANIFEST))
    caps = manifest.capabilities
    assert manifest.component_id == "1689d8b2-c835-2e27-27ad-e894d6d15fa9"
    assert manifest.entry_point == "bin/app"
    assert caps.gpio == (8, 12, "$SAMPLE_LED")
    assert caps.allowed_connections[1] == AllowedConnection(
        host="azure-devices.net", kind="dns", wildcard=True
    )
    assert caps.allowed_connections[2] == AllowedConnection(host="10.0.0.5", kind="ipv4", port=502)
    assert caps.mutable_storage_kb == 64
    assert caps.mutable_storage_bytes == 64 * 1024
    assert caps.device_authentication == TENANT
    assert caps.power_controls == (PowerControl.FORCE_REBOOT, PowerControl.SET_POWER_PROFILE)
    assert caps.declared() == tuple(Capability)


def test_a_minimal_manifest_grants_nothing() -> None:
    manifest = parse_manifest(
        encode({"SchemaVersion": 1, "Name": "quiet", "ComponentId": COMPONENT, "EntryPoint": "/bin/app"})
    )
    assert manifest.capabilities == Capabilities()
    assert manifest.capabilities.declared() == ()
    assert manifest.capabilities.mutable_storage_bytes == 0
    for capability in Capability:
        with pytest.raises(CapabilityNotDeclared) as refused:
            manifest.capabilities.require(capability)
        assert refused.value.capability == capability.value
        assert capability.value in refused.value.message


def test_the_manifest_round_trips_through_its_json() -> None:
    manifest = parse_manifest(encode(AZURE_SPHERE_MANIFEST))
    assert parse_manifest(manifest.to_json()) == manifest


# --- bad manifests, a table --------------------------------------------------------------------------------

BAD_MANIFESTS: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{", "not valid JSON"),
    ("not UTF-8", b'{"Name": "\xff"}', "not UTF-8"),
    ("not an object", b"[]", "must be a JSON object"),
    ("nested too deeply", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ("NaN", b'{"SchemaVersion": NaN}', "NaN is not a JSON number"),
    ("a key twice", b'{"Name": "a", "Name": "b"}', "appears twice"),
    ("an unknown field", with_change(set_field("Debug", True)), "unknown field 'Debug'"),
    ("a field in the wrong case", with_change(set_field("name", "x")), "unknown field 'name'"),
    ("no SchemaVersion", with_change(drop_field("SchemaVersion")), "SchemaVersion is missing"),
    ("no ComponentId", with_change(drop_field("ComponentId")), "ComponentId is missing"),
    ("no EntryPoint", with_change(drop_field("EntryPoint")), "EntryPoint is missing"),
    ("no Name", with_change(drop_field("Name")), "Name is missing"),
    ("schema version 2", with_change(set_field("SchemaVersion", 2)), "SchemaVersion: must be from 1 to 1"),
    ("schema version true", with_change(set_field("SchemaVersion", True)), "must be a whole number"),
    ("schema version 1.0", with_change(set_field("SchemaVersion", 1.0)), "must be a whole number"),
    ("a huge integer", b'{"SchemaVersion": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("an empty name", with_change(set_field("Name", "")), "Name: is letters"),
    ("a name with a newline", with_change(set_field("Name", "a\nb")), "Name: is letters"),
    ("a long name", with_change(set_field("Name", "a" * 129)), "more than the 128 allowed"),
    ("a component id that is no GUID", with_change(set_field("ComponentId", "blink")), "must be a GUID"),
    (
        "the nil GUID",
        with_change(set_field("ComponentId", "00000000-0000-0000-0000-000000000000")),
        "nil GUID",
    ),
    (
        "an entry point with ..",
        with_change(set_field("EntryPoint", "/bin/../../etc/passwd")),
        "not a file name",
    ),
    ("an entry point with //", with_change(set_field("EntryPoint", "bin//app")), "no empty parts"),
    ("an entry point that is a directory", with_change(set_field("EntryPoint", "/bin/")), "no empty parts"),
    ("a hidden entry point", with_change(set_field("EntryPoint", ".app")), "not a file name"),
    ("an entry point too deep", with_change(set_field("EntryPoint", "/a" * 17)), "deeper than 16"),
    ("a debugger application", with_change(set_field("ApplicationType", "Debugger")), "only Default"),
    ("CmdArgs not a list", with_change(set_field("CmdArgs", "--verbose")), "must be a JSON array"),
    ("a CmdArg that is a number", with_change(set_field("CmdArgs", [1])), "CmdArgs[0]: must be a string"),
    ("a CmdArg with NUL", with_change(set_field("CmdArgs", ["a\x00b"])), "NUL"),
    ("too many CmdArgs", with_change(set_field("CmdArgs", ["x"] * 65)), "more than the 64 allowed"),
    ("a long CmdArg", with_change(set_field("CmdArgs", ["x" * 1025])), "more than the 1024 allowed"),
    (
        "Capabilities not an object",
        with_change(set_field("Capabilities", [])),
        "Capabilities: must be a JSON",
    ),
    (
        "an unknown capability",
        with_change(set_capability("WifiConfig", True)),
        "unknown capability 'WifiConfig'",
    ),
    ("a capability in the wrong case", with_change(set_capability("gpio", [1])), "unknown capability 'gpio'"),
    ("a pin that is negative", with_change(set_capability("Gpio", [-1])), "Gpio[0]: must be from 0"),
    ("a pin that is true", with_change(set_capability("Gpio", [True])), "must be a whole number"),
    ("a pin listed twice", with_change(set_capability("Gpio", [3, 3])), "lists 3 twice"),
    ("too many pins", with_change(set_capability("Gpio", list(range(65)))), "more than the 64 allowed"),
    ("a peripheral name with a space", with_change(set_capability("Uart", ["ISU 0"])), "peripheral name"),
    ("a float pin", with_change(set_capability("Pwm", [1.5])), "must be a whole number"),
    ("port 0", with_change(set_capability("AllowedTcpServerPorts", [0])), "must be from 1 to 65535"),
    ("port 65536", with_change(set_capability("AllowedUdpServerPorts", [65536])), "must be from 1 to 65535"),
    (
        "a port as text",
        with_change(set_capability("AllowedTcpServerPorts", ["80"])),
        "must be a whole number",
    ),
    ("a port twice", with_change(set_capability("AllowedTcpServerPorts", [80, 80])), "lists 80 twice"),
    (
        "too many ports",
        with_change(set_capability("AllowedTcpServerPorts", list(range(1, 34)))),
        "than the 32",
    ),
    ("MutableStorage 0", with_change(set_capability("MutableStorage", {"SizeKB": 0})), "must be from 1"),
    (
        "MutableStorage huge",
        with_change(set_capability("MutableStorage", {"SizeKB": 10**9})),
        "must be from 1",
    ),
    ("MutableStorage bare", with_change(set_capability("MutableStorage", 64)), "must be a JSON object"),
    ("MutableStorage no size", with_change(set_capability("MutableStorage", {})), "SizeKB is missing"),
    (
        "MutableStorage extra",
        with_change(set_capability("MutableStorage", {"SizeKB": 1, "Path": "/"})),
        "'Path'",
    ),
    (
        "a tenant that is no GUID",
        with_change(set_capability("DeviceAuthentication", "contoso")),
        "must be a GUID",
    ),
    (
        "a deferral that is text",
        with_change(set_capability("SoftwareUpdateDeferral", "yes")),
        "true or false",
    ),
    ("a notification that is 1", with_change(set_capability("SystemEventNotifications", 1)), "true or false"),
    ("an unknown power control", with_change(set_capability("PowerControls", ["Explode"])), "not one of"),
    ("a power control twice", with_change(set_capability("PowerControls", ["ForceReboot"] * 2)), "twice"),
    ("connections not a list", with_change(set_capability("AllowedConnections", "a.com")), "JSON array"),
    (
        "a connection that is a number",
        with_change(set_capability("AllowedConnections", [1])),
        "must be a string",
    ),
    (
        "too many connections",
        with_change(set_capability("AllowedConnections", ["a.com"] * 101)),
        "than the 100",
    ),
    ("a connection twice", with_change(set_capability("AllowedConnections", ["A.com", "a.com"])), "twice"),
]

BAD_CONNECTIONS = [
    ("", "1 to 261 characters"),
    ("exa mple.com", "is not 1 to 63 letters"),
    ("example..com", "is not 1 to 63 letters"),
    ("-example.com", "is not 1 to 63 letters"),
    ("example-.com", "is not 1 to 63 letters"),
    ("a" * 64 + ".com", "is not 1 to 63 letters"),
    ("a." * 127 + "com", "1 to 253 characters"),
    ("exämple.com", "is not 1 to 63 letters"),
    ("example.com.", "is not 1 to 63 letters"),
    ("*", "only as a leading"),
    ("*.com", "wildcard covers a domain"),
    ("a.*.example.com", "only as a leading"),
    ("*example.com", "only as a leading"),
    ("example.com:0", "port '0'"),
    ("example.com:65536", "port '65536'"),
    ("example.com:080", "port '080'"),
    ("example.com:", "port ''"),
    ("example.com:http", "port 'http'"),
    ("1.2.3", "last label is all digits"),
    ("1.2.3.256", "last label is all digits"),
    ("01.2.3.4", "last label is all digits"),
    ("0.0.0.0", "unspecified address"),  # noqa: S104 - a string refused, nothing binds
    ("::", "unspecified address"),
    ("fe80::1%eth0", "zone"),
    ("[::1]", "followed by :port"),
    ("[::1:443", "closing one"),
    ("[10.0.0.1]:80", "only an IPv6 address"),
    ("[example.com]:80", "only an IPv6 address"),
]


@pytest.mark.parametrize(
    ("case", "document", "expected"), BAD_MANIFESTS, ids=[row[0] for row in BAD_MANIFESTS]
)
def test_a_bad_manifest_is_refused_saying_why(case: str, document: bytes, expected: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_manifest(document)
    assert refused.value.code == "manifest_invalid"
    assert expected in refused.value.message


@pytest.mark.parametrize(
    ("text", "expected"), BAD_CONNECTIONS, ids=[row[0] or "empty" for row in BAD_CONNECTIONS]
)
def test_a_bad_allowed_connection_is_refused_naming_it(text: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_manifest(with_change(set_capability("AllowedConnections", ["ok.example.com", text])))
    assert "AllowedConnections[1]" in refused.value.message
    assert expected in refused.value.message


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Hub.Example.COM", AllowedConnection(host="hub.example.com", kind="dns")),
        ("hub.example.com:8883", AllowedConnection(host="hub.example.com", kind="dns", port=8883)),
        ("localhost", AllowedConnection(host="localhost", kind="dns")),
        ("*.example.com:443", AllowedConnection(host="example.com", kind="dns", port=443, wildcard=True)),
        ("192.168.1.10", AllowedConnection(host="192.168.1.10", kind="ipv4")),
        ("192.168.1.10:502", AllowedConnection(host="192.168.1.10", kind="ipv4", port=502)),
        ("2001:DB8::1", AllowedConnection(host="2001:db8::1", kind="ipv6")),
        ("[2001:db8:0::1]:443", AllowedConnection(host="2001:db8::1", kind="ipv6", port=443)),
        ("3com.example", AllowedConnection(host="3com.example", kind="dns")),
    ],
)
def test_allowed_connections_are_normalised(text: str, parsed: AllowedConnection) -> None:
    assert AllowedConnection.parse(text) == parsed
    assert AllowedConnection.parse(str(parsed)) == parsed


def test_a_manifest_over_the_size_limit_is_refused_before_parsing() -> None:
    limits = ManifestLimits(max_manifest_bytes=100)
    with pytest.raises(PayloadTooLarge) as refused:
        parse_manifest(encode(AZURE_SPHERE_MANIFEST), limits)
    assert refused.value.code == "manifest_too_large"


def test_the_limits_are_configuration() -> None:
    limits = ManifestLimits(max_peripherals=2)
    with pytest.raises(InvalidInput, match="more than the 2 allowed"):
        parse_manifest(with_change(set_capability("Gpio", [1, 2, 3])), limits)
    with pytest.raises(InvalidInput, match="must be from 1 to 8"):
        parse_manifest(
            with_change(set_capability("MutableStorage", {"SizeKB": 16})),
            ManifestLimits(max_mutable_storage_kb=8),
        )
    with pytest.raises(ValueError, match="must be positive"):
        ManifestLimits(max_cmd_args=0)
    with pytest.raises(TypeError):
        ManifestLimits(max_cmd_args=True)


def test_a_manifest_is_bytes() -> None:
    with pytest.raises(TypeError):
        parse_manifest(json.dumps(AZURE_SPHERE_MANIFEST))  # type: ignore[arg-type]


# --- require -----------------------------------------------------------------------------------------------

FULL = parse_manifest(encode(AZURE_SPHERE_MANIFEST)).capabilities

GRANTED: list[tuple[Capability | str, str | int | None]] = [
    (Capability.GPIO, 8),
    ("Gpio", "$SAMPLE_LED"),
    (Capability.UART, "ISU0"),
    (Capability.I2C_MASTER, "ISU2"),
    (Capability.SPI_MASTER, "ISU1"),
    (Capability.ADC, "ADC-CONTROLLER-0"),
    (Capability.PWM, "PWM-CONTROLLER-0"),
    (Capability.ALLOWED_CONNECTIONS, "global.azure-devices-provisioning.net:443"),
    (Capability.ALLOWED_CONNECTIONS, "my-hub.azure-devices.net:8883"),
    (Capability.ALLOWED_CONNECTIONS, "a.b.azure-devices.net"),
    (Capability.ALLOWED_CONNECTIONS, "10.0.0.5:502"),
    (Capability.ALLOWED_TCP_SERVER_PORTS, 8080),
    (Capability.ALLOWED_UDP_SERVER_PORTS, 50000),
    (Capability.MUTABLE_STORAGE, 64),
    (Capability.MUTABLE_STORAGE, None),
    (Capability.DEVICE_AUTHENTICATION, TENANT),
    (Capability.DEVICE_AUTHENTICATION, TENANT.upper()),
    (Capability.SOFTWARE_UPDATE_DEFERRAL, None),
    (Capability.SYSTEM_EVENT_NOTIFICATIONS, None),
    (Capability.POWER_CONTROLS, "ForceReboot"),
]

REFUSED: list[tuple[Capability | str, str | int | None, str]] = [
    (Capability.GPIO, 9, "does not declare Gpio 9"),
    (Capability.GPIO, "8", "does not declare Gpio '8'"),
    (Capability.UART, "ISU1", "does not declare Uart 'ISU1'"),
    (Capability.ALLOWED_CONNECTIONS, "evil.example.com", "AllowedConnections evil.example.com"),
    (Capability.ALLOWED_CONNECTIONS, "azure-devices.net", "AllowedConnections azure-devices.net"),
    (Capability.ALLOWED_CONNECTIONS, "10.0.0.5:503", "AllowedConnections 10.0.0.5:503"),
    (Capability.ALLOWED_CONNECTIONS, "10.0.0.6", "AllowedConnections 10.0.0.6"),
    (Capability.ALLOWED_CONNECTIONS, "*.azure-devices.net", "not a wildcard"),
    (Capability.ALLOWED_CONNECTIONS, "not a host", "is not a host to connect to"),
    (Capability.ALLOWED_TCP_SERVER_PORTS, 50000, "AllowedTcpServerPorts 50000"),
    (Capability.ALLOWED_UDP_SERVER_PORTS, 8080, "AllowedUdpServerPorts 8080"),
    (Capability.MUTABLE_STORAGE, 65, "65 KB is more than the 64 KB declared"),
    (Capability.DEVICE_AUTHENTICATION, COMPONENT, "DeviceAuthentication for tenant"),
    (Capability.POWER_CONTROLS, "ForcePowerDown", "PowerControls 'ForcePowerDown'"),
    ("WifiConfig", None, "'WifiConfig' is not a capability"),
]


@pytest.mark.parametrize(("capability", "detail"), GRANTED)
def test_require_passes_for_what_the_manifest_declares(
    capability: Capability | str, detail: str | int | None
) -> None:
    FULL.require(capability, detail)


@pytest.mark.parametrize(("capability", "detail", "expected"), REFUSED)
def test_require_names_exactly_what_was_not_declared(
    capability: Capability | str, detail: str | int | None, expected: str
) -> None:
    with pytest.raises(CapabilityNotDeclared) as refused:
        FULL.require(capability, detail)
    assert expected in refused.value.message
    assert refused.value.code == "capability_not_declared"
    assert isinstance(refused.value, PermissionDenied)
    assert refused.value.capability == str(capability)
    assert refused.value.detail == detail


@pytest.mark.parametrize(
    ("capability", "detail"),
    [
        (Capability.SOFTWARE_UPDATE_DEFERRAL, "yes"),
        (Capability.ALLOWED_CONNECTIONS, 443),
        (Capability.ALLOWED_TCP_SERVER_PORTS, "8080"),
        (Capability.GPIO, True),
        (Capability.MUTABLE_STORAGE, "64"),
        (Capability.DEVICE_AUTHENTICATION, 1),
        (Capability.POWER_CONTROLS, 1),
    ],
)
def test_require_with_a_detail_of_the_wrong_type_is_a_programming_error(
    capability: Capability, detail: str | int
) -> None:
    with pytest.raises(TypeError):
        FULL.require(capability, detail)


def test_capabilities_built_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match="server port"):
        Capabilities(allowed_tcp_server_ports=(0,))
    with pytest.raises(ValueError, match="SizeKB"):
        Capabilities(mutable_storage_kb=0)
    with pytest.raises(ValueError, match="not a peripheral"):
        FULL.peripherals(Capability.MUTABLE_STORAGE)
    assert FULL.peripherals(Capability.GPIO) == (8, 12, "$SAMPLE_LED")


# --- properties --------------------------------------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
host_names = (
    st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda name: not name[-1:].isdigit())
)
ports = st.integers(min_value=1, max_value=65_535)
ipv4 = st.ip_addresses(v=4).filter(lambda address: not address.is_unspecified).map(str)
ipv6 = (
    st.ip_addresses(v=6)
    .filter(lambda address: not address.is_unspecified)
    .map(lambda address: address.compressed)
)
connections = st.one_of(
    host_names,
    st.builds(lambda host, port: f"{host}:{port}", host_names, ports),
    st.builds(lambda host: f"*.{host}.example", host_names),
    ipv4,
    st.builds(lambda host, port: f"{host}:{port}", ipv4, ports),
    ipv6,
    st.builds(lambda host, port: f"[{host}]:{port}", ipv6, ports),
)
peripherals = st.one_of(
    st.integers(min_value=0, max_value=65_535),
    st.from_regex(r"[A-Za-z0-9_$][A-Za-z0-9_$.:-]{0,20}", fullmatch=True),
)


def _unique_by_type(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if not any(type(value) is type(other) and value == other for other in seen):
            seen.append(value)
    return seen


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    capabilities: dict[str, Any] = {}
    if draw(st.booleans()):
        entries = draw(st.lists(connections, max_size=6))
        capabilities["AllowedConnections"] = list(
            {str(AllowedConnection.parse(entry)): entry for entry in entries}.values()
        )
    for name in ("AllowedTcpServerPorts", "AllowedUdpServerPorts"):
        if draw(st.booleans()):
            capabilities[name] = draw(st.lists(ports, max_size=5, unique=True))
    for name in ("Gpio", "Uart", "I2cMaster", "SpiMaster", "Adc", "Pwm"):
        if draw(st.booleans()):
            capabilities[name] = _unique_by_type(draw(st.lists(peripherals, max_size=5)))
    if draw(st.booleans()):
        capabilities["MutableStorage"] = {"SizeKB": draw(st.integers(min_value=1, max_value=64 * 1024))}
    if draw(st.booleans()):
        capabilities["DeviceAuthentication"] = str(draw(st.uuids()))
    for name in ("SoftwareUpdateDeferral", "SystemEventNotifications"):
        if draw(st.booleans()):
            capabilities[name] = draw(st.booleans())
    if draw(st.booleans()):
        capabilities["PowerControls"] = draw(
            st.lists(st.sampled_from([c.value for c in PowerControl]), unique=True)
        )
    return {
        "SchemaVersion": 1,
        "Name": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True)),
        "ComponentId": str(draw(st.uuids().filter(lambda value: value.int != 0))),
        "EntryPoint": draw(
            st.from_regex(
                r"/?[A-Za-z0-9_][A-Za-z0-9._+-]{0,10}(/[A-Za-z0-9_][a-z.]{0,5}){0,3}", fullmatch=True
            )
        ),
        "CmdArgs": draw(
            st.lists(st.text(st.characters(blacklist_characters="\x00"), max_size=20), max_size=5)
        ),
        "Capabilities": capabilities,
    }


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_property_every_valid_manifest_round_trips(document: dict[str, Any]) -> None:
    manifest = parse_manifest(encode(document))
    assert parse_manifest(manifest.to_json()) == manifest
    assert isinstance(manifest, Manifest)


@settings(max_examples=200, deadline=None)
@given(manifests(), st.text(min_size=1, max_size=20))
def test_property_any_unknown_field_or_capability_is_refused_by_name(
    document: dict[str, Any], name: str
) -> None:
    known_capabilities = {capability.value for capability in Capability}
    if name not in known_capabilities:
        with_capability = copy.deepcopy(document)
        with_capability["Capabilities"][name] = True
        with pytest.raises(InvalidInput, match="unknown capability"):
            parse_manifest(encode(with_capability))
    if name not in AZURE_SPHERE_MANIFEST:
        with_field = copy.deepcopy(document)
        with_field[name] = 1
        with pytest.raises(InvalidInput, match="unknown field"):
            parse_manifest(encode(with_field))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(encode), manifests().map(encode)))
def test_property_any_input_gives_a_manifest_or_a_clear_refusal(data: bytes) -> None:
    try:
        parse_manifest(data)
    except InvalidInput as refused:
        refusal = refused
    else:
        return
    assert refusal.code in ("manifest_invalid", "manifest_too_large")
    assert refusal.message.startswith("manifest")


@settings(max_examples=200, deadline=None)
@given(manifests(), peripherals, ports)
def test_property_require_grants_exactly_the_declared_entries(
    document: dict[str, Any], peripheral: int | str, port: int
) -> None:
    capabilities = parse_manifest(encode(document)).capabilities
    declared_pins = document["Capabilities"].get("Gpio", [])
    for pin in declared_pins:
        capabilities.require(Capability.GPIO, pin)
    if not any(type(pin) is type(peripheral) and pin == peripheral for pin in declared_pins):
        with pytest.raises(CapabilityNotDeclared, match=re.escape(f"Gpio {peripheral!r}")):
            capabilities.require(Capability.GPIO, peripheral)
    declared_ports = document["Capabilities"].get("AllowedTcpServerPorts", [])
    if port in declared_ports:
        capabilities.require(Capability.ALLOWED_TCP_SERVER_PORTS, port)
    else:
        with pytest.raises(CapabilityNotDeclared):
            capabilities.require(Capability.ALLOWED_TCP_SERVER_PORTS, port)
    for entry in capabilities.allowed_connections:
        if not entry.wildcard:
            capabilities.require(Capability.ALLOWED_CONNECTIONS, str(entry) if entry.port else entry.host)


@settings(max_examples=200, deadline=None)
@given(host_names, st.one_of(st.none(), ports), host_names)
def test_property_a_wildcard_covers_subdomains_only(domain: str, port: int | None, sub: str) -> None:
    entry = AllowedConnection.parse(f"*.{domain}.example" + (f":{port}" if port else ""))
    target_port = port or 443
    assert entry.allows(AllowedConnection.parse(f"{sub}.{domain}.example:{target_port}"))
    assert not entry.allows(AllowedConnection.parse(f"{domain}.example:{target_port}"))
    assert not entry.allows(AllowedConnection.parse(f"{sub}.{domain}.example.org:{target_port}"))
