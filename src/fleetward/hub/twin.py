"""Device twins: desired and reported properties, merged by JSON merge patch (RFC 7386). Pure.

As in Azure IoT Hub: each half of the twin is a JSON object with a ``$version`` that grows by one on each
change; a patch sets keys, and ``null`` removes them; keys are 1 to 128 characters without ``.``, ``$``,
space or control characters; objects and arrays nest at most 10 levels; each half serializes to at most
32 KiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fleetward.errors import InvalidInput, PayloadTooLarge
from fleetward.wire.twin import MAX_DEPTH as MAX_DEPTH  # the rules are shared with the agent
from fleetward.wire.twin import Json as Json
from fleetward.wire.twin import JsonObject as JsonObject
from fleetward.wire.twin import check_properties, too_deep
from fleetward.wire.twin import merge as merge


@dataclass(frozen=True)
class TwinHalf:
    """Desired or reported properties and their version."""

    properties: JsonObject
    version: int

    def with_version(self) -> JsonObject:
        """The wire form: the properties with ``$version`` among them."""
        return {**self.properties, "$version": self.version}


@dataclass(frozen=True)
class Twin:
    desired: TwinHalf
    reported: TwinHalf

    def document(self) -> JsonObject:
        """What ``$iothub/twin/GET`` answers."""
        return {"desired": self.desired.with_version(), "reported": self.reported.with_version()}


EMPTY_TWIN = Twin(TwinHalf({}, 1), TwinHalf({}, 1))


def parse_patch(body: bytes, max_bytes: int) -> JsonObject:
    """A patch from a device or an operator: a JSON object, bounded, with valid keys."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"a twin patch holds at most {max_bytes} bytes", code="twin_too_large")
    try:
        patch = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("a twin patch is a JSON object", code="twin_patch_malformed") from None
    except RecursionError:  # thousands of nested arrays or objects: far past the depth bound
        raise too_deep() from None
    if not isinstance(patch, dict):
        raise InvalidInput("a twin patch is a JSON object", code="twin_patch_malformed")
    patch.pop("$version", None)  # the version is the hub's to keep
    check_properties(patch)
    return patch


def _refuse_constant(name: str) -> Json:
    """NaN and Infinity are not JSON (RFC 8259), and a twin must read back in any JSON parser."""
    raise ValueError(f"{name} is not a JSON value")


def apply(half: TwinHalf, patch: JsonObject, max_bytes: int) -> TwinHalf:
    """The next version of ``half`` with ``patch`` merged in, refused if it would pass ``max_bytes``."""
    properties = merge(half.properties, patch)
    size = len(json.dumps(properties, separators=(",", ":")).encode())
    if size > max_bytes:
        raise PayloadTooLarge(
            f"the twin's properties would hold {size} bytes; the bound is {max_bytes}", code="twin_too_large"
        )
    return TwinHalf(properties, half.version + 1)
