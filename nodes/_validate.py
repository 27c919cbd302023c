"""The number check every node's inputs go through: FLOAT and INT widgets finite and within their schema's range.

ComfyUI checks a widget's min/max when a prompt is queued, but NaN passes those comparisons (and is valid JSON
for API clients), and ComfyUI skips them altogether for every input a node's ``validate_inputs`` names. So each
node names its FLOAT inputs (and any INT it validates itself) in ``validate_inputs`` and returns
``check_numbers(cls, locals())`` first: NaN, infinities and values outside the declared range are refused at
queue time, with the node and input in the message. The ranges come from the node's own schema, so they are
written once.

A linked input has no value yet at queue time (it arrives as None and is skipped); ``require_numbers(cls, ...)``
at the start of ``execute`` checks those when the node runs, before anything is computed.

ComfyUI reports a validate_inputs message against every input the function names, so the message itself says
which input is wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from comfy_api.latest import io

from ..noisequery_core.checks import number_problem, range_hint
from ..noisequery_core.errors import NoiseQueryError

_lock = threading.Lock()
# define_schema function -> (node id, {input id: (min, max)}). Keyed by the function, not the class: ComfyUI
# calls validate_inputs on a fresh clone of the node class for every prompt.
_ranges: dict[Any, tuple[str, dict[str, tuple[float | None, float | None]]]] = {}


def number_inputs(node: type) -> tuple[str, dict[str, tuple[float | None, float | None]]]:
    """The node's id and {input id: (min, max)} of its FLOAT and INT inputs, from its schema (cached)."""
    key = getattr(node.define_schema, "__func__", node.define_schema)  # type: ignore[attr-defined]
    with _lock:
        got = _ranges.get(key)
    if got is None:
        schema = node.define_schema()  # type: ignore[attr-defined]
        ranges = {inp.id: (inp.min, inp.max) for inp in schema.inputs
                  if isinstance(inp, (io.Float.Input, io.Int.Input))}
        got = (schema.node_id, ranges)
        with _lock:
            _ranges[key] = got
    return got


def numbers_problem(node: type, values: Mapping[str, Any]) -> str | None:
    """The first of ``values`` (input id -> value) that is not a finite number in its input's range, as a message
    naming the node and input; None when all are fine. Names that are not number inputs, and None values
    (linked inputs, not known yet), are skipped."""
    node_id, ranges = number_inputs(node)
    for name, value in values.items():
        if value is None or name not in ranges:
            continue
        lo, hi = ranges[name]
        problem = number_problem(value, lo, hi)
        if problem is not None:
            return f"{node_id}: input '{name}' {problem}; {range_hint(lo, hi)}."
    return None


def check_numbers(node: type, values: Mapping[str, Any]) -> bool | str:
    """For validate_inputs: True, or the message ComfyUI shows (see numbers_problem)."""
    return numbers_problem(node, values) or True


def require_numbers(node: type, values: Mapping[str, Any]) -> None:
    """For execute: raise NoiseQueryError when a number (e.g. from a linked node) is NaN, infinite or out of range."""
    problem = numbers_problem(node, values)
    if problem is not None:
        raise NoiseQueryError(problem)
