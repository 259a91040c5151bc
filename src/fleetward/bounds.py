"""Checking limit records: every field a positive number, whole unless it may be a fraction.

Limits are configuration with units in their names (CONVENTIONS.md); a record of them checks itself when
built, with :func:`check_positive`, so that a wrong value stops the program at start-up with its name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import fields
from typing import Any


def seconds_may_be_fractions(name: str) -> bool:
    """The usual rule: durations (``…_seconds``) may be fractions; counts and sizes are whole."""
    return name.endswith("_seconds")


def check_positive(
    limits: Any,
    what: str,
    *,
    fractional: Callable[[str], bool] = lambda _name: False,
    only: Collection[str] | None = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first field of the dataclass ``limits`` (or of ``only``)
    that is not a positive number, or not a whole one when ``fractional`` says it must be."""
    for item in fields(limits):
        if only is not None and item.name not in only:
            continue
        value = getattr(limits, item.name)
        may_be_fraction = fractional(item.name)
        if isinstance(value, bool) or not isinstance(value, int | float if may_be_fraction else int):
            kind = "a number" if may_be_fraction else "an int"
            raise TypeError(f"{what} {item.name} must be {kind}, not {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{what} {item.name} must be positive, got {value}")
