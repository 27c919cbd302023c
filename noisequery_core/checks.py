"""Number checks shared by the core and the nodes: every user number finite and in range, or refused by name.

NaN slips through every range test (``nan < 0`` and ``nan > 1`` are both False) and is valid JSON for
Python clients, so numbers from widgets, files and strings go through ``number_problem`` / ``finite``
before they reach a sampler, a manifest or a history.
"""

from __future__ import annotations

import math
from numbers import Real

from .errors import NoiseQueryError


def number_problem(value: object, lo: float | None = None, hi: float | None = None) -> str | None:
    """What is wrong with ``value`` as a number in [lo, hi] ("is NaN ...", "is 5.0, above the maximum 1.0"), or None.

    Booleans and non-numbers are refused; ``lo``/``hi`` of None leave that side open.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"is not a number ({value!r:.40})"
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        return f"is {value!r:.40}, far beyond any usable value"
    if math.isnan(v):
        return "is NaN (not a number)"
    if math.isinf(v):
        return "is +infinity" if v > 0 else "is -infinity"
    if lo is not None and v < lo:
        return f"is {v:g}, below the minimum {lo:g}"
    if hi is not None and v > hi:
        return f"is {v:g}, above the maximum {hi:g}"
    return None


def finite(value: object, what: str, *, lo: float | None = None, hi: float | None = None,
           fix: str = "", error: type[NoiseQueryError] = NoiseQueryError) -> float:
    """``float(value)`` when it is a finite number in [lo, hi]; otherwise raise ``error``.

    Args:
        what: names the number and where it came from ("history pick 2 strength").
        fix: how to put it right; by default "use a finite number [from lo to hi]".
    Raises:
        ``error`` (a NoiseQueryError) with "<what> <problem>; <fix>".
    """
    problem = number_problem(value, lo, hi)
    if problem is not None:
        raise error(f"{what} {problem}; {fix or range_hint(lo, hi)}")
    return float(value)  # type: ignore[arg-type]  # number_problem accepted it as a Real


def range_hint(lo: float | None, hi: float | None) -> str:
    """"use a finite number from lo to hi" (or the open-ended variant)."""
    if lo is not None and hi is not None:
        return f"use a number from {lo:g} to {hi:g}"
    if lo is not None:
        return f"use a finite number of at least {lo:g}"
    if hi is not None:
        return f"use a finite number of at most {hi:g}"
    return "use a finite number"
