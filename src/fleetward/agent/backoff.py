"""Exponential backoff with full jitter, the one rule the agent retries by (renewal, the hub link). Pure."""

from __future__ import annotations

from typing import Protocol


class Uniform(Protocol):
    """``random.Random.uniform``, or a fake that draws what a test wants."""

    def __call__(self, a: float, b: float, /) -> float: ...


def full_jitter(attempt: int, initial_seconds: float, max_seconds: float, uniform: Uniform) -> float:
    """A delay uniform between 0 and ``min(max_seconds, initial_seconds · 2^attempt)`` (``attempt`` from 0),
    so that a fleet cut off at once does not come back at once."""
    ceiling = min(max_seconds, initial_seconds * 2.0 ** min(max(attempt, 0), 62))
    return uniform(0.0, ceiling)
