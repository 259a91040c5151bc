"""Component versions: dotted decimal numbers, compared numerically.

A version is one to four non-negative integers joined by dots (``1``, ``1.4``, ``2.0.13``, ``22.11.0.7``),
each at most nine digits, without leading zeros. Missing trailing parts count as zero, so ``1.2`` equals
``1.2.0``. Pre-release tags are not part of the format: a device reports what it runs, and what it runs is
a release.
"""

from __future__ import annotations

import re

_VERSION = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")

Version = tuple[int, int, int, int]


def parse_version(text: str) -> Version:
    """Parse ``text`` into a comparable tuple, or raise ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise TypeError(f"a version is a str, not {type(text).__name__}")
    if not _VERSION.fullmatch(text):  # fullmatch: "$" alone would let a trailing newline through
        raise ValueError(f"version {text[:40]!r} is not 1 to 4 dot-separated numbers without leading zeros")
    parts = [int(part) for part in text.split(".")]
    parts.extend([0] * (4 - len(parts)))
    return (parts[0], parts[1], parts[2], parts[3])


def check_version(text: str) -> str:
    """Validator form of :func:`parse_version`: return ``text`` unchanged if it is a version."""
    parse_version(text)
    return text
