"""The shared number check: NaN, infinities, non-numbers and out-of-range values are refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from noisequery_core.checks import finite, number_problem
from noisequery_core.errors import NoiseQueryError, QueryError


@pytest.mark.parametrize(("value", "words"), [
    (math.nan, "is NaN"), (math.inf, "+infinity"), (-math.inf, "-infinity"), (True, "not a number"),
    ("0.5", "not a number"), (None, "not a number"), (10**400, "far beyond"), (np.float32("nan"), "is NaN"),
])
def test_bad_numbers_are_named(value: object, words: str) -> None:
    problem = number_problem(value)
    assert problem is not None and words in problem, problem


def test_range_is_checked_and_good_numbers_pass() -> None:
    assert number_problem(0.5, 0.0, 1.0) is None and number_problem(np.float64(1.0), 0.0, 1.0) is None
    assert number_problem(3, 0, 10) is None
    assert "below the minimum 0" in (number_problem(-5, 0.0, 1.0) or "")
    assert "above the maximum 1" in (number_problem(1.5, 0.0, 1.0) or "")


def test_finite_returns_the_float_or_raises_the_given_error() -> None:
    assert finite(np.float32(0.25), "x") == 0.25 and isinstance(finite(2, "x"), float)
    with pytest.raises(QueryError) as err:
        finite(math.nan, "query text_weight", error=QueryError)
    assert str(err.value) == "query text_weight is NaN (not a number); use a finite number"
    with pytest.raises(NoiseQueryError, match=r"strength is 2, above the maximum 1; clear it"):
        finite(2.0, "strength", lo=0.0, hi=1.0, fix="clear it")
    with pytest.raises(NoiseQueryError, match=r"use a number from 0 to 1"):
        finite(-math.inf, "strength", lo=0.0, hi=1.0)
