"""Query terms: each part of a query, scored per library row by a small class with one ``score(rows)`` method.

A term's raw values are on its own scale (a cosine, a colour-mass fraction, a negative distance); the
Searcher (search/query.py) standardises them on a sample of the library and adds them up by weight.
One builder per kind of part (``clip_terms``, ``color_term``, ``stat_term``, ``region_term``,
``layout_term``) turns it into its term and raises QueryError for a malformed part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import QueryError
from ..library.storage import Library
from . import color
from .index import ClipSearcher

if TYPE_CHECKING:  # the query's description types (query.py imports this module at run time)
    from .query import Query, RegionTarget, StatTarget


class Term(Protocol):
    """One part of a query, scored per library row; higher raw values match better."""

    name: str  # the label in Hit.terms and reports
    weight: float  # standard deviations of this term per unit of the total

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        """Raw values for library ``rows`` (int64 indices, any order), or for every row in order when None."""
        ...


def _pick(a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The last axis of a column-major array at ``rows`` (all of it for None)."""
    return a if rows is None else a[..., rows]


class ScanColumns:
    """Column-major copies of the colour columns the terms scan (one contiguous array per feature)."""

    def __init__(self, library: Library):
        self.count = library.count
        self.stats = np.ascontiguousarray(np.asarray(library.column("stats"), dtype=np.float32).T)  # [S, N]
        # float32 so a colour query is a few contiguous multiply-adds per active bin (the
        # histogram is the only colour feature scanned in full: 256 B per entry in RAM).
        self.hist = np.ascontiguousarray(np.asarray(library.column("hist"), dtype=np.float32).T)  # [B, N]
        self.regions = np.ascontiguousarray(np.asarray(library.column("regions")).transpose(1, 2, 0))  # fp16 [R,3,N]


@dataclass(eq=False)
class ClipTerm:
    """Cosine of the stored CLIP image embedding with a query vector (text, negative text or example image)."""

    name: str
    weight: float
    vector: np.ndarray  # [D] float32, unit length
    searcher: ClipSearcher

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        if rows is None:
            rows = np.arange(self.searcher.library.count, dtype=np.int64)
        return self.searcher.scores(rows, self.vector)


def clip_terms(query: Query, encode_text: Callable[[str], np.ndarray], dim: int, searcher: ClipSearcher) -> list[ClipTerm]:
    """The query's CLIP terms: text, negative text (negative weight), example image.

    ``encode_text`` gives the library's CLIP text embedding; ``dim`` is the library's CLIP width.
    Raises QueryError for an example embedding of another width.
    """
    terms: list[ClipTerm] = []
    if query.text.strip():
        terms.append(ClipTerm("text", query.text_weight, encode_text(query.text), searcher))
    if query.negative_text.strip():
        terms.append(ClipTerm("negative_text", -abs(query.negative_weight), encode_text(query.negative_text), searcher))
    if query.image_embedding is not None:
        e = np.asarray(query.image_embedding, dtype=np.float32).reshape(-1)
        if e.shape[0] != dim:
            raise QueryError(f"Example-image embedding has {e.shape[0]} dimensions, the library's CLIP has {dim}.")
        terms.append(ClipTerm("image", query.image_weight, e / max(float(np.linalg.norm(e)), 1e-12), searcher))
    return terms


# The colour term is the seam for the colour representation: it is the only term that reads the
# histogram (with ScanColumns.hist and the colour-only MMR features), so a different representation
# (e.g. a perceptual palette) replaces ColorTerm and color_term and leaves the Searcher as it is.
@dataclass(eq=False)
class ColorTerm:
    """How much of the image's colour mass lies near a target colour (histogram weighted by a colour kernel)."""

    name: str
    weight: float
    hist: np.ndarray  # [B, N] float32: the library's colour histograms, column-major
    kernel: np.ndarray  # [B] weight of each bin for the target colour (color.color_kernel)
    active: np.ndarray  # bins whose kernel weight matters

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        out = np.zeros(self.hist.shape[1] if rows is None else len(rows), np.float32)
        for b in self.active:
            out += self.kernel[b] * _pick(self.hist[b], rows)
        return out


def color_term(cols: ScanColumns, hexcol: str, weight: float) -> ColorTerm:
    """A dominant-colour term for ``hexcol`` ('#RRGGBB'); raises QueryError for a malformed colour."""
    kern = color.color_kernel(color.parse_hex_color(hexcol))
    active = np.nonzero(kern > 1e-2)[0]  # the rest holds a few % of the kernel's mass
    return ColorTerm(f"color {hexcol}", float(weight), cols.hist, kern, active)


@dataclass(eq=False)
class StatTargetTerm:
    """Closeness of a statistic to a target value: −|x − target|."""

    name: str
    weight: float
    column: np.ndarray  # [N] float32
    target: float

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        return -np.abs(_pick(self.column, rows) - np.float32(self.target))


@dataclass(eq=False)
class StatRangeTerm:
    """Distance of a statistic outside a range (0 inside): −(max(lo − x, 0) + max(x − hi, 0))."""

    name: str
    weight: float
    column: np.ndarray  # [N] float32
    lo: float | None
    hi: float | None

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        x = _pick(self.column, rows)
        d = np.zeros_like(x)
        if self.lo is not None:
            d += np.maximum(np.float32(self.lo) - x, 0)
        if self.hi is not None:
            d += np.maximum(x - np.float32(self.hi), 0)
        return -d


def stat_term(cols: ScanColumns, st: StatTarget) -> StatTargetTerm | StatRangeTerm:
    """A statistic term (a target wins over a range when both are given); raises QueryError for bad targets."""
    if st.name not in color.STAT_INDEX:
        raise QueryError(f"Unknown statistic {st.name!r}; known: {', '.join(color.STAT_NAMES)}.")
    spec = color.STATS[color.STAT_INDEX[st.name]]
    if st.target is None and st.lo is None and st.hi is None:
        raise QueryError(f"Statistic {st.name!r} needs a target value or a range.")
    for label, val in (("target", st.target), ("lo", st.lo), ("hi", st.hi)):
        if val is not None and not (spec.lo - 1e-9 <= float(val) <= spec.hi + 1e-9):
            raise QueryError(f"{st.name} {label} {val} is outside its range {spec.lo}..{spec.hi}.")
    if st.lo is not None and st.hi is not None and st.lo > st.hi:
        raise QueryError(f"{st.name}: range low {st.lo} is above high {st.hi}.")
    col = cols.stats[color.STAT_INDEX[st.name]]
    if st.target is not None:
        return StatTargetTerm(f"{st.name}={st.target}", float(st.weight), col, st.target)
    return StatRangeTerm(f"{st.name} in [{st.lo},{st.hi}]", float(st.weight), col, st.lo, st.hi)


@dataclass(eq=False)
class RegionColorTerm:
    """Closeness of a region's mean colour to a target: −(CIELAB distance)."""

    name: str
    weight: float
    lab: np.ndarray  # [3, N] float16: the region's mean L, a, b
    target: np.ndarray  # [3] CIELAB

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        d2 = sum((_pick(self.lab[c], rows).astype(np.float32) - self.target[c]) ** 2 for c in range(3))
        return -np.sqrt(d2)


@dataclass(eq=False)
class RegionLightnessTerm:
    """Closeness of a region's mean lightness to a target 0..1: −|L − 100·target|."""

    name: str
    weight: float
    lightness: np.ndarray  # [N] float16: the region's mean L (0..100)
    target: float

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        return -np.abs(_pick(self.lightness, rows).astype(np.float32) - 100.0 * self.target)


def region_term(cols: ScanColumns, rt: RegionTarget) -> RegionColorTerm | RegionLightnessTerm:
    """A region term (a colour wins over a lightness when both are given); raises QueryError for bad targets."""
    if rt.region not in color.REGION_NAMES:
        raise QueryError(f"Unknown region {rt.region!r}; known: {', '.join(color.REGION_NAMES)}.")
    if rt.color is None and rt.lightness is None:
        raise QueryError(f"Region {rt.region!r} needs a colour or a lightness.")
    if rt.lightness is not None and not 0.0 <= rt.lightness <= 1.0:
        raise QueryError(f"Lightness {rt.lightness} for region {rt.region!r} must be between 0 and 1.")
    r = color.REGION_NAMES.index(rt.region)
    if rt.color is not None:
        target = color.srgb_to_lab(color.parse_hex_color(rt.color))
        return RegionColorTerm(f"{rt.region} {rt.color}", float(rt.weight), cols.regions[r], target)
    assert rt.lightness is not None  # checked above
    return RegionLightnessTerm(f"{rt.region} L={rt.lightness}", float(rt.weight), cols.regions[r, 0], rt.lightness)


@dataclass(eq=False)
class LayoutTerm:
    """Closeness of the coarse colour layout to an example's: −(mean CIELAB distance over the grid cells)."""

    name: str
    weight: float
    library: Library
    target: np.ndarray  # [GRID*GRID, 3] CIELAB

    _CHUNK = 16384  # rows converted to CIELAB at a time

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        layout_col = self.library.column("layout")
        idx = np.arange(self.library.count) if rows is None else np.asarray(rows)
        out = np.empty(len(idx), np.float32)
        for s in range(0, len(idx), self._CHUNK):
            part = idx[s : s + self._CHUNK]
            lab = color.layout_to_lab(layout_col[part]).reshape(len(part), -1, 3)
            out[s : s + len(part)] = -np.sqrt(((lab - self.target) ** 2).sum(-1)).mean(-1)
        return out


def layout_term(library: Library, layout: np.ndarray, weight: float) -> LayoutTerm:
    """A layout term for an example's uint8 [GRID, GRID, 3] layout; raises QueryError for another shape."""
    target = color.layout_to_lab(np.asarray(layout)).reshape(-1, 3)
    if target.shape != (color.GRID * color.GRID, 3):
        raise QueryError(f"Layout must be a {color.GRID}×{color.GRID}×3 grid, got {np.asarray(layout).shape}.")
    return LayoutTerm("layout", float(weight), library, target)
