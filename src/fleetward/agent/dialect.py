"""The device's side of the Azure IoT Hub MQTT dialect (docs/wire.md, "The hub"). Pure: no sockets, no clocks.

Topic names the agent publishes to, and the typed records that what the hub publishes becomes::

    publish    devices/{id}/messages/events/{property bag}            telemetry (QoS 1)
               devices/{id}/modules/{module}/messages/events/{bag}    telemetry, as a module session
               $iothub/twin/GET/?$rid={rid}                            ask for the twin
               $iothub/twin/PATCH/properties/reported/?$rid={rid}      report properties
               $iothub/methods/res/{status}/?$rid={rid}                answer a direct method
    receive    $iothub/twin/res/{status}/?$rid={rid}[&$version={v}]    TwinResponse
               $iothub/twin/PATCH/properties/desired/?$version={v}     DesiredPatch
               $iothub/methods/POST/{name}/?$rid={rid}                 MethodCall
               devices/{id}/messages/devicebound/{property bag}        CloudMessage

Property bags are bounded as the hub bounds them (64 pairs, keys 1 to 128 characters, values up to 1,024),
so that the agent refuses a message when it is put, not when the hub would close the connection for it.
This module imports nothing from the cloud side: the bounds are repeated here from the wire contract.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from fleetward.errors import InvalidInput, ProtocolViolation
from fleetward.wire.twin import Json as Json
from fleetward.wire.twin import JsonObject as JsonObject

Properties = tuple[tuple[str, str], ...]

API_VERSION = "2021-04-12"
MAX_PROPERTIES = 64
MAX_PROPERTY_KEY_CHARS = 128
MAX_PROPERTY_VALUE_CHARS = 1024
#: system properties a caller may set on telemetry (``$.mid`` is set by the outbox)
CALLER_SYSTEM_PROPERTIES = frozenset({"$.ct", "$.ce", "$.cid"})
MESSAGE_ID = "$.mid"

TWIN_RESPONSES = "$iothub/twin/res/#"
TWIN_DESIRED = "$iothub/twin/PATCH/properties/desired/#"
METHODS = "$iothub/methods/POST/#"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_METHOD_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def username(hub_name: str, device_id: str, module_id: str | None = None) -> str:
    """The IoT Hub user name: ``{hub host}/{device id}/?api-version=…``, or for a module session
    ``{hub host}/{device id}/{module id}/?api-version=…``."""
    session = device_id if module_id is None else f"{device_id}/{module_id}"
    return f"{hub_name}/{session}/?api-version={API_VERSION}"


def client_id(device_id: str, module_id: str | None = None) -> str:
    """The MQTT client id: the device id, or ``{device id}/{module id}`` for a module session."""
    return device_id if module_id is None else f"{device_id}/{module_id}"


def cloud_to_device_filter(device_id: str) -> str:
    return f"devices/{device_id}/messages/devicebound/#"


def telemetry_topic(device_id: str, encoded_properties: str = "", module_id: str | None = None) -> str:
    if module_id is not None:
        return f"devices/{device_id}/modules/{module_id}/messages/events/{encoded_properties}"
    return f"devices/{device_id}/messages/events/{encoded_properties}"


def twin_get_topic(request_id: str) -> str:
    return f"$iothub/twin/GET/?$rid={check_request_id(request_id)}"


def twin_reported_topic(request_id: str) -> str:
    return f"$iothub/twin/PATCH/properties/reported/?$rid={check_request_id(request_id)}"


def method_response_topic(status: int, request_id: str) -> str:
    if not 0 <= status <= 999:
        raise ValueError("a method status is 0 to 999")
    return f"$iothub/methods/res/{status}/?$rid={check_request_id(request_id)}"


def check_request_id(request_id: str) -> str:
    if not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("a $rid is 1 to 128 letters, digits or ._:-")
    return request_id


def check_method_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a method name is a str, not {type(name).__name__}")
    if not _METHOD_NAME.fullmatch(name):
        raise ValueError("a method name is 1 to 128 letters, digits or ._-")
    return name


# ---------------------------------------------------------------------- property bags


def check_properties(
    properties: Mapping[str, str] | Iterable[tuple[str, str]], *, reserved: int = 0
) -> Properties:
    """Application (and ``$.ct``/``$.ce``/``$.cid``) properties, as the hub will accept them.

    ``reserved`` pairs are kept free for what the agent adds itself (the message id, the drop count).
    Keys the agent sets (``$.mid``, ``fleetward.…``) and other ``$`` keys are refused.
    """
    pairs = tuple(properties.items()) if isinstance(properties, Mapping) else tuple(properties)
    if len(pairs) > MAX_PROPERTIES - reserved:
        raise InvalidInput(
            f"a message has at most {MAX_PROPERTIES - reserved} properties", code="bad_properties"
        )
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError("properties are (key, value) pairs")
        key, value = pair
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("property keys and values are str")
        if not key or len(key) > MAX_PROPERTY_KEY_CHARS or len(value) > MAX_PROPERTY_VALUE_CHARS:
            raise InvalidInput(
                f"a property key is 1 to {MAX_PROPERTY_KEY_CHARS} characters and a value at most "
                f"{MAX_PROPERTY_VALUE_CHARS}",
                code="bad_properties",
            )
        if (key.startswith("$") and key not in CALLER_SYSTEM_PROPERTIES) or key.startswith("fleetward."):
            raise InvalidInput(f"the property {key!r} is reserved", code="reserved_property")
    return pairs


def encode_properties(properties: Properties) -> str:
    """The URL-encoded bag that ends a telemetry topic (``%24.mid=…&alert=1``)."""
    return urlencode(properties, quote_via=quote)


def decode_properties(bag: str) -> Properties:
    try:
        pairs = parse_qsl(
            bag, keep_blank_values=True, strict_parsing=bool(bag), max_num_fields=MAX_PROPERTIES
        )
    except ValueError:
        raise ProtocolViolation("a property bag that is not key=value pairs", code="bad_properties") from None
    return tuple(pairs)


# ---------------------------------------------------------------------- what the hub sends


@dataclass(frozen=True)
class TwinResponse:
    status: int
    request_id: str
    version: int | None
    body: bytes


@dataclass(frozen=True)
class DesiredPatch:
    """A desired-property patch as the hub pushed it (``null`` removes a key)."""

    version: int
    patch: JsonObject


@dataclass(frozen=True)
class MethodCall:
    name: str
    request_id: str
    payload: bytes

    def json(self) -> Json:
        """The payload as JSON (the operator API always sends JSON; ``null`` when there is none)."""
        if not self.payload:
            return None
        try:
            value: Json = json.loads(self.payload)
        except ValueError:
            raise InvalidInput("the method payload is not JSON", code="bad_payload") from None
        return value


@dataclass(frozen=True)
class CloudMessage:
    """A cloud-to-device message; ``message_id`` is the hub's ``$.mid``, stable across redeliveries."""

    message_id: str
    properties: Properties
    body: bytes
    redelivered: bool = False

    def property(self, key: str) -> str | None:
        return next((value for name, value in self.properties if name == key), None)


Incoming = TwinResponse | DesiredPatch | MethodCall | CloudMessage


def _query(suffix: str) -> dict[str, str]:
    if not suffix.startswith("?"):
        raise ProtocolViolation("a topic without its ?$rid or ?$version", code="bad_topic")
    try:
        return dict(parse_qsl(suffix[1:], strict_parsing=True, max_num_fields=8))
    except ValueError:
        raise ProtocolViolation("malformed topic parameters", code="bad_topic") from None


def _integer(text: str | None, what: str) -> int:
    if text is None or not text.isdigit() or len(text) > 18:
        raise ProtocolViolation(f"the hub sent a bad {what}", code="bad_topic")
    return int(text)


def parse_json_object(body: bytes, what: str) -> JsonObject:
    try:
        value = json.loads(body)
    except ValueError:
        raise ProtocolViolation(f"the hub sent {what} that is not JSON", code="bad_json") from None
    if not isinstance(value, dict):
        raise ProtocolViolation(f"the hub sent {what} that is not a JSON object", code="bad_json")
    return value


def split_version(document: JsonObject, what: str) -> tuple[int, JsonObject]:
    """``{"a": 1, "$version": 3}`` → ``(3, {"a": 1})``."""
    version = document.get("$version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ProtocolViolation(f"the hub sent {what} without a $version", code="bad_json")
    return version, {key: value for key, value in document.items() if key != "$version"}


def classify_incoming(device_id: str, topic: str, payload: bytes, *, dup: bool = False) -> Incoming:
    """What a PUBLISH from the hub is; :class:`ProtocolViolation` if it is none of the four."""
    if topic.startswith("$iothub/twin/res/"):
        status_text, separator, suffix = topic[len("$iothub/twin/res/") :].partition("/")
        if not separator:
            raise ProtocolViolation("a twin response without its status", code="bad_topic")
        query = _query(suffix)
        version = query.get("$version")
        return TwinResponse(
            status=_integer(status_text, "twin status"),
            request_id=query.get("$rid", ""),
            version=None if version is None else _integer(version, "twin version"),
            body=payload,
        )
    if topic.startswith("$iothub/twin/PATCH/properties/desired/"):
        document = parse_json_object(payload, "a desired patch")
        desired_version, patch = split_version(document, "a desired patch")
        return DesiredPatch(desired_version, patch)
    if topic.startswith("$iothub/methods/POST/"):
        name, separator, suffix = topic[len("$iothub/methods/POST/") :].partition("/")
        request_id = _query(suffix).get("$rid", "")
        if not separator or not _METHOD_NAME.fullmatch(name) or not _REQUEST_ID.fullmatch(request_id):
            raise ProtocolViolation("a method call with a bad name or $rid", code="bad_topic")
        return MethodCall(name, request_id, payload)
    prefix = f"devices/{device_id}/messages/devicebound/"
    if topic.startswith(prefix):
        pairs = decode_properties(topic[len(prefix) :])
        message_id = next((value for key, value in pairs if key == MESSAGE_ID), "")
        return CloudMessage(message_id, pairs, payload, dup)
    raise ProtocolViolation(f"the hub published to an unexpected topic {topic[:80]!r}", code="bad_topic")
