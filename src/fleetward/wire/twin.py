"""What a device twin may hold, as the hub checks it and as the agent checks it before sending: keys of 1 to
128 characters without ``.``, ``$``, a space or a control character, at every level (objects inside arrays
too), and at most ten levels of nesting, arrays counting as levels. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Union

from fleetward.errors import InvalidInput

Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]  # noqa: UP007 - recursive alias
JsonObject = dict[str, Json]

MAX_DEPTH = 10
MAX_KEY_CHARS = 128
_FORBIDDEN_KEY_CHARACTERS = frozenset(".$ ")


def too_deep() -> InvalidInput:
    return InvalidInput(f"twin properties nest at most {MAX_DEPTH} levels", code="twin_too_deep")


def check_properties(
    value: Mapping[str, object], depth: int = 1, *, too_deep: Callable[[], InvalidInput] = too_deep
) -> None:
    """Refuse ``value`` (an object at nesting level ``depth``) if a key or its depth breaks the rules;
    ``too_deep`` words the refusal for where the object sits."""
    if depth > MAX_DEPTH:
        raise too_deep()
    for key, item in value.items():
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidInput(f"a twin key is 1 to {MAX_KEY_CHARS} characters", code="twin_bad_key")
        if _FORBIDDEN_KEY_CHARACTERS & set(key) or not key.isprintable():
            raise InvalidInput(
                f"twin key {key[:32]!r} holds '.', '$', a space or a control character", code="twin_bad_key"
            )
        _check_value(item, depth + 1, too_deep)


def _check_value(item: object, depth: int, too_deep: Callable[[], InvalidInput]) -> None:
    if isinstance(item, dict):
        check_properties(item, depth, too_deep=too_deep)
    elif isinstance(item, list):
        if depth > MAX_DEPTH:
            raise too_deep()
        for element in item:
            _check_value(element, depth + 1, too_deep)


def merge(properties: Mapping[str, Json], patch: Mapping[str, Json]) -> JsonObject:
    """RFC 7386: ``patch`` applied to ``properties``; ``None`` removes a key. Neither input changes."""
    merged: JsonObject = dict(properties)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            current = merged.get(key)
            merged[key] = merge(current if isinstance(current, dict) else {}, value)
        else:
            merged[key] = value
    return merged
