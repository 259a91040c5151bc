"""Which topics a device may use: the pure policy core of the hub, in the Azure IoT Hub device dialect.

A device publishes to and subscribes to its own topics, and nothing else::

    publish    devices/{id}/messages/events/{property bag}          telemetry
               $iothub/twin/GET/?$rid={rid}                          ask for the twin
               $iothub/twin/PATCH/properties/reported/?$rid={rid}    report properties
               $iothub/methods/res/{status}/?$rid={rid}              answer a direct method
    subscribe  devices/{id}/messages/devicebound/#                   cloud-to-device messages
               $iothub/methods/POST/#                                direct methods
               $iothub/twin/res/#                                    answers to twin requests
               $iothub/twin/PATCH/properties/desired/#               desired-property patches

A module session (a client id ``{device}/{module}``, as in IoT Hub and IoT Edge) has the same topics but
its own telemetry topic, ``devices/{id}/modules/{module}/messages/events/{property bag}``; its twin topics
address the module's twin and its methods are those sent to the module. Modules have no cloud-to-device
messages (IoT Hub has none for them).

A quarantined device (each of its sessions) keeps only the twin: it may ask for it, report to it, and
receive desired patches (the remediation instructions); telemetry, direct methods and cloud-to-device
messages are refused. Every refusal raises :class:`AccessRefused`; the shell closes nothing for it but
records a security event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl, quote, urlencode

from fleetward.errors import AccessRefused, InvalidInput
from fleetward.wire.baseline import REPORT_PROPERTY

MAX_PROPERTIES = 64
MAX_PROPERTY_KEY_CHARS = 128
MAX_PROPERTY_VALUE_CHARS = 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_METHOD_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


class AccessMode(StrEnum):
    """What a connected device may do: everything its dialect offers, or only what remediation needs."""

    FULL = "full"
    QUARANTINED = "quarantined"


class Subscription(StrEnum):
    CLOUD_TO_DEVICE = "cloud-to-device"
    METHODS = "methods"
    TWIN_RESPONSES = "twin-responses"
    TWIN_DESIRED = "twin-desired"


#: What a quarantined device may still subscribe to.
_QUARANTINE_SUBSCRIPTIONS = frozenset({Subscription.TWIN_RESPONSES, Subscription.TWIN_DESIRED})


@dataclass(frozen=True)
class Telemetry:
    properties: tuple[tuple[str, str], ...]

    @property
    def report_kind(self) -> str | None:
        """The kind of the agent's own report this message carries (a crash, a baseline), if it is one."""
        for key, value in self.properties:
            if key == REPORT_PROPERTY:
                return value
        return None


@dataclass(frozen=True)
class TwinGet:
    request_id: str


@dataclass(frozen=True)
class TwinReported:
    request_id: str


@dataclass(frozen=True)
class MethodResponse:
    request_id: str
    status: int


DevicePublish = Telemetry | TwinGet | TwinReported | MethodResponse


def _refused(message: str, code: str = "topic_refused") -> AccessRefused:
    return AccessRefused(message, code=code)


def parse_properties(bag: str) -> tuple[tuple[str, str], ...]:
    """A URL-encoded property bag (``$.ct=application%2Fjson&alert=1``), bounded in count and size."""
    if not bag:
        return ()
    try:
        pairs = parse_qsl(bag, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_PROPERTIES)
    except ValueError:
        raise _refused("the property bag is not URL-encoded key=value pairs", "bad_properties") from None
    for key, value in pairs:
        if not key or len(key) > MAX_PROPERTY_KEY_CHARS or len(value) > MAX_PROPERTY_VALUE_CHARS:
            raise _refused("a property key or value is empty or too long", "bad_properties")
    return tuple(pairs)


def check_application_properties(properties: tuple[tuple[str, str], ...]) -> None:
    """Properties the cloud sets on a message: bounded like a device's, and none in the ``$`` system space."""
    if len(properties) > MAX_PROPERTIES:
        raise InvalidInput(f"a message has at most {MAX_PROPERTIES} properties", code="bad_properties")
    for key, value in properties:
        if not key or len(key) > MAX_PROPERTY_KEY_CHARS or len(value) > MAX_PROPERTY_VALUE_CHARS:
            raise InvalidInput("a property key or value is empty or too long", code="bad_properties")
        if key.startswith("$"):
            raise InvalidInput("application properties may not start with '$'", code="bad_properties")


def _query(suffix: str) -> dict[str, str]:
    """The ``?$rid=…&$version=…`` part of a twin or method topic."""
    if not suffix.startswith("?"):
        raise _refused("a request topic needs ?$rid=…")
    try:
        return dict(parse_qsl(suffix[1:], strict_parsing=True, max_num_fields=8))
    except ValueError:
        raise _refused("the request parameters are malformed") from None


def _request_id(suffix: str) -> str:
    request_id = _query(suffix).get("$rid", "")
    if not _REQUEST_ID.fullmatch(request_id):
        raise _refused("a request needs a $rid of 1 to 128 letters, digits or ._:-")
    return request_id


def telemetry_prefix(device_id: str, module_id: str | None = None) -> str:
    """Where a device's (or one of its modules') telemetry goes, before the property bag."""
    if module_id is None:
        return f"devices/{device_id}/messages/events"
    return f"devices/{device_id}/modules/{module_id}/messages/events"


def classify_publish(
    device_id: str, topic: str, mode: AccessMode = AccessMode.FULL, module_id: str | None = None
) -> DevicePublish:
    """What a PUBLISH from ``device_id`` (or its module ``module_id``) to ``topic`` is, if it may send
    it; else :class:`AccessRefused`."""
    events = telemetry_prefix(device_id, module_id)
    decided: DevicePublish
    if topic == events or topic.startswith(events + "/"):
        decided = Telemetry(parse_properties(topic[len(events) + 1 :]))
    elif topic.startswith("$iothub/twin/GET/"):
        decided = TwinGet(_request_id(topic[len("$iothub/twin/GET/") :]))
    elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
        decided = TwinReported(_request_id(topic[len("$iothub/twin/PATCH/properties/reported/") :]))
    elif topic.startswith("$iothub/methods/res/"):
        status_text, separator, suffix = topic[len("$iothub/methods/res/") :].partition("/")
        if not separator or not status_text.isdigit() or len(status_text) > 3:
            raise _refused("a method response is $iothub/methods/res/{status}/?$rid={rid}")
        decided = MethodResponse(_request_id(suffix), int(status_text))
    else:
        raise _refused(f"device {device_id[:16]}… may not publish to {topic[:80]!r}")
    if mode is AccessMode.QUARANTINED and not isinstance(decided, TwinGet | TwinReported):
        raise _refused("the device is quarantined: it may only use its twin", "quarantined")
    return decided


_SESSION_FILTERS = {
    "$iothub/methods/POST/#": Subscription.METHODS,
    "$iothub/twin/res/#": Subscription.TWIN_RESPONSES,
    "$iothub/twin/PATCH/properties/desired/#": Subscription.TWIN_DESIRED,
}


def classify_subscribe(
    device_id: str, topic_filter: str, mode: AccessMode = AccessMode.FULL, module_id: str | None = None
) -> Subscription:
    """What a subscription of ``device_id`` (or its module ``module_id``) to ``topic_filter`` is, if it
    may make it. A module has no cloud-to-device messages."""
    subscription = _SESSION_FILTERS.get(topic_filter)
    if module_id is None and topic_filter == f"devices/{device_id}/messages/devicebound/#":
        subscription = Subscription.CLOUD_TO_DEVICE
    if subscription is None:
        who = f"device {device_id[:16]}…" if module_id is None else f"module {module_id[:64]!r}"
        raise _refused(f"{who} may not subscribe to {topic_filter[:80]!r}")
    if mode is AccessMode.QUARANTINED and subscription not in _QUARANTINE_SUBSCRIPTIONS:
        raise _refused("the device is quarantined: it may only use its twin", "quarantined")
    return subscription


def check_method_name(name: str) -> str:
    if not _METHOD_NAME.fullmatch(name):
        raise ValueError("a method name is 1 to 128 letters, digits or ._-")
    return name


# ---------------------------------------------------------------------- topics the hub publishes to


def twin_response_topic(status: int, request_id: str, version: int | None = None) -> str:
    suffix = f"&$version={version}" if version is not None else ""
    return f"$iothub/twin/res/{status}/?$rid={request_id}{suffix}"


def desired_patch_topic(version: int) -> str:
    return f"$iothub/twin/PATCH/properties/desired/?$version={version}"


def method_request_topic(name: str, request_id: str) -> str:
    return f"$iothub/methods/POST/{name}/?$rid={request_id}"


def cloud_to_device_topic(device_id: str, message_id: str, properties: tuple[tuple[str, str], ...]) -> str:
    system = (("$.mid", message_id), ("$.to", f"/devices/{device_id}/messages/deviceBound"))
    return f"devices/{device_id}/messages/devicebound/" + urlencode(system + properties, quote_via=quote)
