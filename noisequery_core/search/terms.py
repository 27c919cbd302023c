"""Query terms: each part of a query, scored per library row by a small class with one ``score(rows)`` method.

A term's raw values are on its own scale (a cosine, a share of the pixels, a negative distance); the
Searcher (search/query.py) standardises them on a sample of the library and adds them up by weight.
One builder per kind of part (``clip_terms``, ``color_terms``, ``stat_term``, ``region_term``,
``layout_term``) turns it into its term(s) and raises QueryError for a malformed part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import QueryError
from ..library.storage import Library
from . import color, palette
from .index import ClipSearcher
from .mapped import transposed

if TYPE_CHECKING:  # the query's description types (query.py imports this module at run time)
    from .query import Query, RegionTarget, StatTarget


class Term(Protocol):
    """One part of a query, scored per library row; higher raw values match better."""

    name: str  # the label in Hit.terms and reports
    weight: float  # standard deviations of this term per unit of the total

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        """Raw values for library ``rows`` (int64 indices, any order), or for every row in order when None.

        Always a new float32 array that the caller may change in place (the Searcher scales it there).
        """
        ...


def _pick(a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The last axis of a column-major array at ``rows`` (all of it for None)."""
    return a if rows is None else a[..., rows]


class ScanColumns:
    """Column-major copies of the colour columns the terms scan, each made on its first use.

    One contiguous array per statistic (4 B per entry) and per region's mean lightness (2 B per
    entry), read from the memory-mapped column whose pages are then released (mapped.transposed):
    a library queried by brightness alone holds 4 B per entry for it, not the 110 B of every
    statistic and region.
    """

    def __init__(self, library: Library):
        self.library = library
        self.count = library.count
        self.color_version = library.features.color_version
        self._stats: dict[int, np.ndarray] = {}
        self._lightness: dict[int, np.ndarray] = {}
        self._palette: palette.PaletteColumns | None = None

    def stat(self, index: int) -> np.ndarray:
        """float32 [N]: statistic ``index`` (color.STATS order) of every entry."""
        got = self._stats.get(index)
        if got is None:
            got = self._stats[index] = transposed(self.library.column("stats"), (index,), dtype=np.float32)
        return got

    def region_lightness(self, region: int) -> np.ndarray:
        """float16 [N]: mean CIELAB L (0..100) of region ``region`` (color.REGION_NAMES order) of every entry."""
        got = self._lightness.get(region)
        if got is None:
            got = self._lightness[region] = transposed(self.library.column("regions"), (region, 0))
        return got

    def palette_columns(self) -> palette.PaletteColumns:
        """The palette columns laid out for the scan (on first use: 40 B per entry in RAM, 8 more per region queried).

        Raises QueryError, saying how to upgrade, for a library of an older colour version.
        """
        if self.color_version != color.COLOR_VERSION:
            lib = self.library
            raise QueryError(
                f"Library {lib.path} has colour features v{self.color_version}; colour queries need "
                f"v{color.COLOR_VERSION}. Upgrade it once with `python -m noisequery_core upgrade --library {lib.path}` "
                "(add `--images <folder>` to recompute from the original images instead of the thumbnails). "
                "Text, statistic, lightness and layout queries work without it."
            )
        if self._palette is None:
            self._palette = palette.PaletteColumns.from_rows(self.library.column("palette"), self.library.column("palette_shares"))
        return self._palette


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


# The colour terms are the seam for the colour representation: ColorTerm (also for region colours) and ColorMixTerm are the
# only terms that read the palette columns (ScanColumns.palette_columns, search/palette.py).
@dataclass(eq=False)
class ColorTerm:
    """How much of the image (or of a region) is a colour: the share of its pixels within CIEDE2000 20."""

    name: str
    weight: float
    columns: palette.PaletteColumns
    target: np.ndarray  # [3] CIELAB
    region: int = 0  # color.REGION_NAMES index; 0 is the whole image

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        return palette.colour_share_scores(self.columns, self.target, region=self.region, rows=rows)


@dataclass(eq=False)
class ColorMixTerm:
    """How well the image holds a mix of colours ("mostly orange, some blue"): palette.colour_mix_scores."""

    name: str
    weight: float
    columns: palette.PaletteColumns
    targets: list[np.ndarray]  # CIELAB per colour
    proportions: list[float]  # the colours' weights, used as proportions

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        return palette.colour_mix_scores(self.columns, self.targets, self.proportions, rows=rows)


def color_term(cols: ScanColumns, hexcol: str, weight: float) -> ColorTerm:
    """A colour term for ``hexcol`` ('#RRGGBB'); raises QueryError for a malformed colour or an older library."""
    target = color.srgb_to_lab(color.parse_hex_color(hexcol))
    return ColorTerm(f"color {hexcol}", float(weight), cols.palette_columns(), target)


def color_terms(cols: ScanColumns, colors: Sequence[tuple[str, float]]) -> list[ColorTerm | ColorMixTerm]:
    """The terms of a query's colours: several colours all weighted above 0 are ONE mix term (their
    weights are the proportions, their sum its weight); otherwise one term per colour (a negative
    weight avoids that colour). Raises QueryError for a malformed colour or an older library."""
    if len(colors) > 1 and all(float(w) > 0 for _, w in colors):
        targets = [color.srgb_to_lab(color.parse_hex_color(h)) for h, _ in colors]
        weights = [float(w) for _, w in colors]
        label = "colors " + " + ".join(f"{h} {w / sum(weights):.0%}" for (h, _), w in zip(colors, weights))
        return [ColorMixTerm(label, sum(weights), cols.palette_columns(), targets, weights)]
    return [color_term(cols, hexcol, w) for hexcol, w in colors]


def palette_term(cols: ScanColumns, colours: Sequence[tuple[str, float]], weight: float) -> ColorMixTerm:
    """An example image's palette as one mix term named "palette": how much of each of its colours an image holds,
    up to the example's proportion (a histogram intersection, palette.colour_mix_scores), wherever the colour is.
    Raises QueryError for a malformed colour, no colours, or an older library."""
    if not colours:
        raise QueryError("The example's palette has no colours to compare.")
    targets = [color.srgb_to_lab(color.parse_hex_color(h)) for h, _ in colours]
    return ColorMixTerm("palette", float(weight), cols.palette_columns(), targets, [float(p) for _, p in colours])


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
    col = cols.stat(color.STAT_INDEX[st.name])
    if st.target is not None:
        return StatTargetTerm(f"{st.name}={st.target}", float(st.weight), col, st.target)
    return StatRangeTerm(f"{st.name} in [{st.lo},{st.hi}]", float(st.weight), col, st.lo, st.hi)


@dataclass(eq=False)
class RegionLightnessTerm:
    """Closeness of a region's mean lightness to a target 0..1: −|L − 100·target|."""

    name: str
    weight: float
    lightness: np.ndarray  # [N] float16: the region's mean L (0..100)
    target: float

    def score(self, rows: np.ndarray | None) -> np.ndarray:
        return -np.abs(_pick(self.lightness, rows).astype(np.float32) - 100.0 * self.target)


def region_term(cols: ScanColumns, rt: RegionTarget) -> ColorTerm | RegionLightnessTerm:
    """A region term (a colour wins over a lightness when both are given); raises QueryError for bad targets."""
    if rt.region not in color.REGION_NAMES:
        raise QueryError(f"Unknown region {rt.region!r}; known: {', '.join(color.REGION_NAMES)}.")
    if rt.color is None and rt.lightness is None:
        raise QueryError(f"Region {rt.region!r} needs a colour or a lightness.")
    if rt.lightness is not None and not 0.0 <= rt.lightness <= 1.0:
        raise QueryError(f"Lightness {rt.lightness} for region {rt.region!r} must be between 0 and 1.")
    r = color.REGION_NAMES.index(rt.region)
    if rt.color is not None:  # the share of the region's pixels in that colour
        target = color.srgb_to_lab(color.parse_hex_color(rt.color))
        return ColorTerm(f"{rt.region} {rt.color}", float(rt.weight), cols.palette_columns(), target, region=r)
    assert rt.lightness is not None  # checked above
    return RegionLightnessTerm(f"{rt.region} L={rt.lightness}", float(rt.weight), cols.region_lightness(r), rt.lightness)


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


def colour_side_terms(cols: ScanColumns, query: Query) -> list[Term]:
    """The query's colour-side terms, in order: colours, statistics, regions, layout, palette, scoring the rows of
    ``cols.library`` (a library, or any rows with its columns: refine scores its renders so). Raises QueryError for
    a malformed part or an older library."""
    terms: list[Term] = [*color_terms(cols, query.colors)]
    terms += [stat_term(cols, st) for st in query.stats]
    terms += [region_term(cols, rt) for rt in query.regions]
    if query.layout is not None:
        terms.append(layout_term(cols.library, query.layout, query.layout_weight))
    if query.palette:
        terms.append(palette_term(cols, query.palette, query.palette_weight))
    return terms
