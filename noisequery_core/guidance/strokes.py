"""Highlights: the widget's strokes JSON and mask regions, read into one ``Highlight`` per phrase.

A highlight ties a phrase of the prompt to a region drawn as one or more strokes (polylines with a
width, in resolution-independent coordinates) or given as a mask. The strokes JSON format is shared
with the drawing widget (kept in sync with web/js/highlight_scribble.js)::

    {"version": 1, "strokes": [{"phrase": "a cat", "width": 0.06,
                                "points": [[x, y], ...], "color": "#e6194b"}]}

x and y are fractions of the image width and height (x right, y down); ``width`` is the stroke
width as a fraction of the image's shorter side; ``color`` is for the widget (and the preview) only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import HighlightError

HIGHLIGHTS_VERSION = 1
EMPTY_HIGHLIGHTS = json.dumps({"version": HIGHLIGHTS_VERSION, "strokes": []})
# Limits on the strokes JSON. They bound the region-map work of one guide run to a few seconds whatever the
# drawing (tests/core/test_highlight.py times the worst shapes found); the widget adds a point every 3 canvas
# pixels (web/js/highlight_scribble.js), so a stroke across its canvas has about a hundred.
MAX_STROKES = 256
MAX_POINTS = 2048  # per stroke
MAX_TOTAL_POINTS = 4096  # over all strokes
MAX_PHRASES = 32  # different phrases (each is its own region map and attention term)
# Points may lie a little outside the image (a stroke drawn off the edge of the canvas).
COORD_SLACK = 0.25


@dataclass(frozen=True)
class Stroke:
    """One polyline of a highlight, in resolution-independent coordinates."""

    phrase: str
    width: float
    points: tuple[tuple[float, float], ...]
    color: str | None = None


@dataclass
class Highlight:
    """A phrase and where it goes: strokes and/or masks ([H, W] float in 0..1, any resolution)."""

    phrase: str
    strokes: list[Stroke] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)

    def describe(self) -> str:
        """E.g. ``'a cat' (2 strokes, 1 mask)``."""
        parts = []
        if self.strokes:
            parts.append(f"{len(self.strokes)} stroke{'s' if len(self.strokes) != 1 else ''}")
        if self.masks:
            parts.append(f"{len(self.masks)} mask{'s' if len(self.masks) != 1 else ''}")
        return f"'{self.phrase}' ({', '.join(parts)})"


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HighlightError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def parse_strokes(text: str | None, where: str = "highlights") -> list[Stroke]:
    """Parse the widget's strokes JSON.

    Args:
        text: the JSON; '' or None means no strokes.
        where: how the message names the input (e.g. the node input's name).
    Returns:
        The strokes in order, phrases stripped.
    Raises:
        HighlightError: the text is not JSON of the documented form; the message names the stroke
            and field and says how to fix it.
    """
    if text is None or not text.strip():
        return []
    fix = ("redraw the strokes in the node, or give JSON like "
           '{"version": 1, "strokes": [{"phrase": "a cat", "width": 0.05, "points": [[0.2, 0.5], [0.6, 0.5]]}]}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HighlightError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {fix}") from None
    except RecursionError:  # nesting deeper than Python's parser goes: a hostile or broken workflow
        raise HighlightError(f"{where}: the JSON is nested too deeply to be highlights; {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("strokes"), list):
        raise HighlightError(f"{where}: expected an object with a 'strokes' list; {fix}")
    version = data.get("version", HIGHLIGHTS_VERSION)
    if version != HIGHLIGHTS_VERSION:
        raise HighlightError(f"{where}: strokes format version {version!r} is not supported (this pack reads "
                             f"version {HIGHLIGHTS_VERSION}); update the pack or redraw the strokes")
    if len(data["strokes"]) > MAX_STROKES:
        raise HighlightError(f"{where}: {len(data['strokes'])} strokes, at most {MAX_STROKES} are allowed; merge or "
                             "remove some")
    out: list[Stroke] = []
    total = 0
    for i, s in enumerate(data["strokes"]):
        at = f"{where}: stroke {i + 1}"
        if not isinstance(s, dict):
            raise HighlightError(f"{at} is not an object; {fix}")
        phrase = s.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            raise HighlightError(f"{at} has no phrase: pick the phrase this stroke places (a part of the prompt)")
        width = _num(s.get("width"), f"{at} width")
        if not 0.0 < width <= 1.0:
            raise HighlightError(f"{at} width {width} is outside (0, 1] (a fraction of the image's shorter side)")
        pts = s.get("points")
        if not isinstance(pts, list) or len(pts) < 2:
            raise HighlightError(f"{at} needs at least 2 points [x, y], got {pts!r:.80}")
        if len(pts) > MAX_POINTS:
            raise HighlightError(f"{at} has {len(pts)} points, at most {MAX_POINTS} per stroke ({MAX_TOTAL_POINTS} in "
                                 "all) are allowed; simplify or split the stroke")
        total += len(pts)
        if total > MAX_TOTAL_POINTS:
            raise HighlightError(f"{at} brings the strokes to {total} points, more than the {MAX_TOTAL_POINTS} allowed "
                                 f"in all (at most {MAX_STROKES} strokes of up to {MAX_POINTS} points): remove or "
                                 "simplify some strokes")
        points = []
        for j, p in enumerate(pts):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise HighlightError(f"{at} point {j + 1} must be [x, y], got {p!r:.40}")
            x, y = _num(p[0], f"{at} point {j + 1} x"), _num(p[1], f"{at} point {j + 1} y")
            if not (-COORD_SLACK <= x <= 1 + COORD_SLACK and -COORD_SLACK <= y <= 1 + COORD_SLACK):
                raise HighlightError(f"{at} point {j + 1} ({x}, {y}) is far outside the image; coordinates are "
                                     "fractions of the width and height (0..1)")
            points.append((x, y))
        color = s.get("color")
        out.append(Stroke(phrase.strip(), width, tuple(points), color if isinstance(color, str) else None))
    phrases = {s.phrase for s in out}
    if len(phrases) > MAX_PHRASES:
        raise HighlightError(f"{where}: {len(phrases)} different phrases, at most {MAX_PHRASES} can be placed; give "
                             "several strokes the same phrase, or remove some")
    return out


def strokes_to_json(strokes: Sequence[Stroke]) -> str:
    """The widget's JSON for ``strokes`` (inverse of parse_strokes)."""
    return json.dumps({"version": HIGHLIGHTS_VERSION, "strokes": [
        {"phrase": s.phrase, "width": s.width, "points": [list(p) for p in s.points],
         **({"color": s.color} if s.color else {})} for s in strokes]})


def check_masks(masks: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse malformed or empty mask highlights (nothing is silently ignored).

    Args:
        masks: (phrase, [H, W] mask) pairs.
    Raises:
        HighlightError: a mask is not 2-D, has NaN/inf values, or has no value >= 0.5.
    """
    for i, (phrase, m) in enumerate(masks):
        if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') must be one [H, W] mask, got shape {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') has NaN/inf values")
        if float(m.max()) < 0.5:
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') is empty (no value >= 0.5): paint the region "
                                 "white in the mask, or remove this highlight")


def group_highlights(strokes: Sequence[Stroke], masks: Sequence[tuple[str, torch.Tensor]] = ()) -> list[Highlight]:
    """One Highlight per phrase (in first-seen order, strokes before masks), gathering its strokes and masks."""
    by_phrase: dict[str, Highlight] = {}
    for s in strokes:
        by_phrase.setdefault(s.phrase, Highlight(s.phrase)).strokes.append(s)
    for phrase, m in masks:
        by_phrase.setdefault(phrase, Highlight(phrase)).masks.append(m)
    return list(by_phrase.values())


def read_highlights(text: str | None, masks: Sequence[tuple[str, torch.Tensor]] = (),
                    where: str = "highlights") -> list[Highlight]:
    """Everything a guide places, from the widget's JSON and the mask highlights, in one step.

    Args:
        text: the strokes JSON (see parse_strokes); '' or None for none.
        masks: (phrase, [H, W] mask) pairs, e.g. from mask highlight nodes.
        where: how messages name the strokes input.
    Returns:
        One Highlight per phrase, in first-seen order (see group_highlights); never empty.
    Raises:
        HighlightError: malformed JSON or masks (see parse_strokes, check_masks), or no highlight at all.
    """
    strokes = parse_strokes(text, where)
    check_masks(masks)
    groups = group_highlights(strokes, masks)
    if not groups:
        raise HighlightError(f"no highlights: '{where}' has no strokes and no mask highlight was given. Draw a "
                             "stroke on the node's canvas for a phrase of the prompt, or connect NoiseQuery Highlight "
                             "Mask nodes to mask_highlights")
    return groups
