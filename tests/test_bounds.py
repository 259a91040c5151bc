"""Limit records check themselves: positive numbers, whole unless they may be fractions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fleetward.bounds import check_positive, seconds_may_be_fractions


@dataclass
class Limits:
    max_items: object = 10
    timeout_seconds: object = 1.5


@pytest.mark.parametrize(
    ("limits", "error", "message"),
    [
        (Limits(max_items=0), ValueError, "example max_items must be positive, got 0"),
        (Limits(max_items=2.5), TypeError, "example max_items must be an int, not float"),
        (Limits(max_items=True), TypeError, "example max_items must be an int, not bool"),
        (Limits(timeout_seconds=-1.0), ValueError, "example timeout_seconds must be positive"),
        (Limits(timeout_seconds="1"), TypeError, "example timeout_seconds must be a number, not str"),
    ],
)
def test_a_limit_that_is_not_a_positive_number_of_its_kind_is_refused_by_name(
    limits: Limits, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_positive(limits, "example", fractional=seconds_may_be_fractions)


def test_good_limits_pass_and_only_the_named_fields_are_checked() -> None:
    check_positive(Limits(), "example", fractional=seconds_may_be_fractions)
    check_positive(Limits(timeout_seconds="unchecked"), "example", only=("max_items",))
