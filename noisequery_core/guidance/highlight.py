"""Highlight ("scribble") guidance: strokes -> soft region maps, phrase tokens, attention bias, refocus loss.

A highlight ties a phrase of the prompt to a region drawn as one or more strokes (polylines with a
width, in resolution-independent coordinates) or given as a mask. The region becomes a soft map at
any grid size (every attention resolution of a UNet, any aspect ratio); the map keeps the stroke's
shape and direction, unlike a bounding box. Two mechanisms use the maps:

* attention modulation: an additive bias on the cross-attention logits of the phrase's token
  columns, positive inside its region and negative outside (``attention_bias``);
* refocusing: a loss on the phrase's cross-attention maps (mass outside the region, coverage of
  the region; ``refocus_loss``) whose gradient moves the latent in the first steps, as Attention
  Refocusing / BoxDiff do.

The strokes JSON format is shared with the drawing widget (kept in sync with
web/js/highlight_scribble.js)::

    {"version": 1, "strokes": [{"phrase": "a cat", "width": 0.06,
                                "points": [[x, y], ...], "color": "#e6194b"}]}

x and y are fractions of the image width and height (x right, y down); ``width`` is the stroke
width as a fraction of the image's shorter side; ``color`` is for the widget only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
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
# Region maps are computed on at most MAX_MAP_SIDE cells per side and resized beyond: every attention level of an
# SD1.x image up to 1024 px and an SDXL one up to 2048 px is exact. The regions preview is a quarter of the image,
# at most PREVIEW_MAX_SIDE on its longer side.
MAX_MAP_SIDE = 128
PREVIEW_MAX_SIDE = 512
# A map value below exp(-E_CUT^2 / 2) (1.5e-8) is 0, and a block of cells over which the map provably varies by
# less than MAP_TOLERANCE is interpolated from its corners: every value is within MAP_TOLERANCE of the exact one
# (and far closer in practice), and the flat parts of soft strokes cost a few blocks instead of every cell.
E_CUT = 6.0
MAP_TOLERANCE = 0.01
PAIR_CHUNK = 1 << 18  # (block, segment) distances computed at once: bounds the working memory (~100 MB)
# Stroke points closer than this many grid cells to the previous one are dropped before a map is computed
# (distances move by less than that: invisible, and a dense stroke on a coarse grid costs what a simple one does).
THIN_CELLS = 0.02
# Points may lie a little outside the image (a stroke drawn off the edge of the canvas).
COORD_SLACK = 0.25

# Attention bias at strength 1, in logit units: exp(IN + OUT) ~ 400x more attention per pixel
# inside the region than outside for the phrase's tokens (measured by tests/host: mass inside
# >= 0.8 for regions <= 25% of the image on the tiny SD1.5 UNet).
BIAS_INSIDE = 3.0
BIAS_OUTSIDE = 3.0
SCHEDULES = ("cosine", "linear", "constant")


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
        parts = []
        if self.strokes:
            parts.append(f"{len(self.strokes)} stroke{'s' if len(self.strokes) != 1 else ''}")
        if self.masks:
            parts.append(f"{len(self.masks)} mask{'s' if len(self.masks) != 1 else ''}")
        return f"'{self.phrase}' ({', '.join(parts)})"


# ------------------------------------------------------------------ strokes JSON


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HighlightError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def parse_strokes(text: str | None, where: str = "highlights") -> list[Stroke]:
    """Parse the widget's strokes JSON; '' or None means no strokes.

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


def group_highlights(strokes: Sequence[Stroke], masks: Sequence[tuple[str, torch.Tensor]] = ()) -> list[Highlight]:
    """One Highlight per phrase (in first-seen order), gathering its strokes and masks."""
    by_phrase: dict[str, Highlight] = {}
    for s in strokes:
        by_phrase.setdefault(s.phrase, Highlight(s.phrase)).strokes.append(s)
    for phrase, m in masks:
        by_phrase.setdefault(phrase, Highlight(phrase)).masks.append(m)
    return list(by_phrase.values())


# ------------------------------------------------------------------ region maps


def _grid(h: int, w: int, aspect: float) -> torch.Tensor:
    """Pixel centres of an h x w grid in 'shorter side' units: [h*w, 2] (x, y)."""
    sx, sy = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * sy
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * sx
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def _units(h: int, w: int, aspect: float | None) -> tuple[float, float, float]:
    """(sx, sy, cell): the grid's extent in 'shorter side' units and its larger cell side."""
    aspect = aspect if aspect is not None else w / h
    sx, sy = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    return sx, sy, max(sx / w, sy / h)


def _thin(points: Sequence[tuple[float, float]], sx: float, sy: float, tol: float) -> np.ndarray:
    """The polyline in shorter-side units [n, 2], without points closer than ``tol`` to the previous kept one.

    Dropping such a point moves the polyline by less than ``tol`` (every dropped point lies within ``tol`` of a
    kept one), so distances change by less than ``tol``; the last point is always kept.
    """
    pts = np.asarray(points, dtype=np.float64) * np.array([sx, sy])
    if tol <= 0 or len(pts) <= 2:
        return pts
    keep = [0]
    last = pts[0]
    for i in range(1, len(pts) - 1):
        if math.dist(pts[i], last) >= tol:
            keep.append(i)
            last = pts[i]
    keep.append(len(pts) - 1)
    return pts[keep]


def _segment_table(strokes: Sequence[Stroke], sx: float, sy: float, cell: float, softness: float
                   ) -> tuple[np.ndarray, ...]:
    """Every segment of ``strokes`` as (ax, ay, abx, aby, radius, falloff), each [S], in shorter-side units.

    The radius never drops below half a grid cell and the falloff below 0.35 cell, so a thin stroke still
    marks the cells it crosses at coarse attention resolutions. Points closer than THIN_CELLS cell to the
    previous one are dropped first (a dense stroke on a coarse grid shrinks to the segments that matter).
    """
    cols: list[list[np.ndarray]] = [[], [], [], [], [], []]
    for st in strokes:
        pts = _thin(st.points, sx, sy, THIN_CELLS * cell)
        r = max(st.width / 2.0, 0.5 * cell)
        sigma = max(softness * r, 0.35 * cell)
        n = len(pts) - 1
        for col, part in zip(cols, (pts[:-1, 0], pts[:-1, 1], np.diff(pts[:, 0]), np.diff(pts[:, 1]),
                                    np.full(n, r), np.full(n, sigma))):
            col.append(part)
    return tuple(np.concatenate(c) for c in cols)


def _pair_excess(px: np.ndarray, py: np.ndarray, g: np.ndarray, table: tuple[np.ndarray, ...]) -> np.ndarray:
    """(d - r) / sigma of points (px, py) to segments g, pairwise; d = point-segment distance. Overwrites px, py."""
    ax, ay, abx, aby, inv_len2, rad, inv_sig = table
    bx, by = abx[g], aby[g]
    px -= ax[g]
    py -= ay[g]
    t = px * bx
    t += py * by
    t *= inv_len2[g]
    np.clip(t, 0.0, 1.0, out=t)
    px -= t * bx
    py -= t * by
    d = np.hypot(px, py, out=px)
    d -= rad[g]
    d *= inv_sig[g]
    return d


def _falloff_map(strokes: Sequence[Stroke], h: int, w: int, sx: float, sy: float, cell: float,
                 softness: float) -> np.ndarray:
    """max over strokes of each stroke's soft map, on an h x w grid: [h, w] float64.

    A stroke's map is 1 within its radius r of the polyline and exp(-e^2 / 2) beyond, e = (d - r) / sigma;
    the max over strokes is the map of the smallest e over all their segments. Computed on a quadtree of cell
    blocks, each with the segments that can still be nearest to one of its cells: a block provably inside a
    stroke is 1, one beyond E_CUT is 0, one over which the map provably varies by less than MAP_TOLERANCE is
    interpolated from the exact values at its corners, and the others split in four. The work follows the region
    boundaries instead of cells x segments, in chunks of PAIR_CHUNK (block, segment) pairs.
    """
    out = np.zeros((h, w), dtype=np.float64)
    ax, ay, abx, aby, rad, sig = _segment_table(strokes, sx, sy, cell, softness)
    table = (ax, ay, abx, aby, 1.0 / np.maximum(abx * abx + aby * aby, 1e-18), rad, 1.0 / sig)
    cw, ch = sx / w, sy / h
    size = 1 << max(0, math.ceil(math.log2(max(h, w))))  # block side (cells) at the root
    bi = np.zeros(1, dtype=np.int64)  # block row / column of each block of the current level
    bj = np.zeros(1, dtype=np.int64)
    pn = np.zeros(len(ax), dtype=np.int64)  # (block, segment) pairs still in play
    ps = np.arange(len(ax), dtype=np.int64)
    quad_i, quad_j = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    while len(bi):
        # centre and half-diagonal of each block's cell centres (blocks are clipped to the grid)
        r0, c0 = bi * size, bj * size
        r1, c1 = np.minimum(r0 + size, h) - 1, np.minimum(c0 + size, w) - 1
        cy, cx = (r0 + r1 + 1) * (0.5 * ch), (c0 + c1 + 1) * (0.5 * cw)
        half = np.hypot((c1 - c0) * (0.5 * cw), (r1 - r0) * (0.5 * ch))
        e_lo = np.empty(len(pn))
        e_hi = np.empty(len(pn))
        for s in range(0, len(pn), PAIR_CHUNK):
            n, g = pn[s:s + PAIR_CHUNK], ps[s:s + PAIR_CHUNK]
            e = _pair_excess(cx[n], cy[n], g, table)
            slack = half[n] * table[6][g]  # half the block's diagonal, in e units
            np.maximum(e - slack, 0.0, out=e_lo[s:s + PAIR_CHUNK])
            np.maximum(e + slack, 0.0, out=e_hi[s:s + PAIR_CHUNK])
        lo = np.full(len(bi), np.inf)
        np.minimum.at(lo, pn, e_lo)  # no cell of the block has a smaller e
        hi = np.full(len(bi), np.inf)
        np.minimum.at(hi, pn, e_hi)  # every cell of the block has an e at most this
        if size == 1:  # single cells: lo == hi is the exact value
            live = lo < E_CUT
            out[bi[live], bj[live]] = np.exp(-0.5 * lo[live] ** 2)
            break
        for k in np.flatnonzero(hi == 0):  # wholly inside a stroke
            out[r0[k]:r1[k] + 1, c0[k]:c1[k] + 1] = 1.0
        top, bottom = np.exp(-0.5 * lo ** 2), np.exp(-0.5 * np.minimum(hi, E_CUT) ** 2)
        live = (hi > 0) & (lo < E_CUT)
        flat = live & (top - bottom <= MAP_TOLERANCE)
        keep = live[pn] & (e_lo <= hi[pn]) & (e_lo < E_CUT)
        pn, ps = pn[keep], ps[keep]
        if flat.any():
            _fill_flat(out, flat, pn, ps, (r0, r1, c0, c1), (cw, ch), (top, bottom), table)
            stay = ~flat[pn]
            pn, ps = pn[stay], ps[stay]
        # the 2 x 2 children of every open block; pairs follow their block
        opened = np.flatnonzero(live & ~flat)
        slot = np.full(len(bi), -1, dtype=np.int64)
        slot[opened] = np.arange(len(opened))
        size //= 2
        kids_i = (bi[opened, None] * 2 + quad_i).reshape(-1)
        kids_j = (bj[opened, None] * 2 + quad_j).reshape(-1)
        valid = (kids_i * size < h) & (kids_j * size < w)
        new_id = np.cumsum(valid) - 1
        pair_kids = (slot[pn][:, None] * 4 + np.arange(4)).reshape(-1)
        ok = valid[pair_kids]
        pn, ps = new_id[pair_kids[ok]], np.repeat(ps, 4)[ok]
        bi, bj = kids_i[valid], kids_j[valid]
    return out


def _fill_flat(out: np.ndarray, flat: np.ndarray, pn: np.ndarray, ps: np.ndarray, box: tuple[np.ndarray, ...],
               cell: tuple[float, float], bounds: tuple[np.ndarray, np.ndarray], table: tuple[np.ndarray, ...]) -> None:
    """Fill each ``flat`` block bilinearly from the exact e at its four corner cells, clamped to its bounds."""
    r0, r1, c0, c1 = box
    cw, ch = cell
    top, bottom = bounds
    sel = flat[pn]
    fn, fs = pn[sel], ps[sel]
    corner_e = np.full((len(flat), 4), np.inf)
    for k, (rr, cc) in enumerate(((r0, c0), (r0, c1), (r1, c0), (r1, c1))):
        for s in range(0, len(fn), PAIR_CHUNK):
            n, g = fn[s:s + PAIR_CHUNK], fs[s:s + PAIR_CHUNK]
            e = _pair_excess((cc[n] + 0.5) * cw, (rr[n] + 0.5) * ch, g, table)
            np.minimum.at(corner_e[:, k], n, np.maximum(e, 0.0))
    for b in np.flatnonzero(flat):
        e00, e01, e10, e11 = corner_e[b]
        u = np.linspace(0.0, 1.0, c1[b] - c0[b] + 1)
        v = np.linspace(0.0, 1.0, r1[b] - r0[b] + 1)[:, None]
        e = (e00 * (1 - u) + e01 * u) * (1 - v) + (e10 * (1 - u) + e11 * u) * v
        out[r0[b]:r1[b] + 1, c0[b]:c1[b] + 1] = np.clip(np.exp(-0.5 * e * e), bottom[b], top[b])


def _map_grid(h: int, w: int) -> tuple[int, int]:
    """The grid a region map is computed on: h x w, or the same shape shrunk to MAX_MAP_SIDE."""
    scale = min(1.0, MAX_MAP_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def preview_shape(width: int, height: int) -> tuple[int, int]:
    """(h, w) of the regions preview of a width x height image: a quarter of it, at most PREVIEW_MAX_SIDE long."""
    w, h = max(8, width // 4), max(8, height // 4)
    scale = min(1.0, PREVIEW_MAX_SIDE / max(w, h))
    return max(8, round(h * scale)), max(8, round(w * scale))


def strokes_map(strokes: Sequence[Stroke], h: int, w: int, aspect: float | None = None,
                softness: float = 0.5) -> torch.Tensor:
    """Soft region of several strokes (the max of their maps) on an h x w grid: [h, w] float32 in 0..1.

    Each stroke's map is 1 within half the stroke width of the polyline, then a Gaussian falloff of
    ``softness * half width``. The radius never drops below ~ half a grid cell, so a thin stroke
    still marks the cells it crosses at coarse attention resolutions. Grids larger than MAX_MAP_SIDE
    on a side (previews of very large images) are computed at that size and resized (bilinear), which
    keeps the work bounded whatever the image size.

    Args:
        aspect: image width / height (default w / h). Distances are measured in units of the
            image's shorter side, so a stroke keeps its shape at any aspect ratio.
        softness: falloff length as a fraction of the half width (0 = hard edge).
    """
    if not strokes:
        return torch.zeros(h, w, dtype=torch.float32)
    gh, gw = _map_grid(h, w)
    sx, sy, cell = _units(gh, gw, aspect if aspect is not None else w / h)
    m = torch.from_numpy(_falloff_map(strokes, gh, gw, sx, sy, cell, softness)).to(torch.float32)
    if (gh, gw) != (h, w):
        m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return m


def stroke_map(stroke: Stroke, h: int, w: int, aspect: float | None = None, softness: float = 0.5) -> torch.Tensor:
    """Soft region of one stroke on an h x w grid: [h, w] float32 in 0..1 (see ``strokes_map``)."""
    return strokes_map([stroke], h, w, aspect, softness)


def resize_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A [H, W] mask resampled to [h, w] (area average when shrinking, bilinear when growing)."""
    m = mask.to(torch.float32)[None, None]
    mode = "area" if (h <= m.shape[-2] and w <= m.shape[-1]) else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(m, size=(h, w), mode=mode, **kwargs)[0, 0].clamp(0, 1)


def highlight_map(hl: Highlight, h: int, w: int, aspect: float | None = None, softness: float = 0.5) -> torch.Tensor:
    """The union (max) of a highlight's strokes and masks on an h x w grid: [h, w] in 0..1."""
    out = strokes_map(hl.strokes, h, w, aspect, softness)
    for m in hl.masks:
        out = torch.maximum(out, resize_mask(m, h, w))
    return out


def check_masks(masks: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse empty or malformed masks (nothing is silently ignored)."""
    for i, (phrase, m) in enumerate(masks):
        if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') must be one [H, W] mask, got shape {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') has NaN/inf values")
        if float(m.max()) < 0.5:
            raise HighlightError(f"mask highlight {i + 1} ('{phrase}') is empty (no value >= 0.5): paint the region "
                                 "white in the mask, or remove this highlight")


def principal_axis_degrees(m: torch.Tensor, aspect: float | None = None) -> float:
    """Orientation of a map's principal axis in degrees in [0, 180), x right / y down, in image units."""
    h, w = m.shape
    aspect = aspect if aspect is not None else w / h
    g = _grid(h, w, aspect)
    wt = m.reshape(-1).to(torch.float64)
    wt = wt / wt.sum().clamp_min(1e-12)
    mu = (g * wt[:, None]).sum(0)
    c = g - mu
    cov = (c[:, :, None] * c[:, None, :] * wt[:, None, None]).sum(0)
    evals, evecs = torch.linalg.eigh(cov)
    v = evecs[:, -1]
    return float(math.degrees(math.atan2(float(v[1]), float(v[0]))) % 180.0)


def map_centroid_and_area(m: torch.Tensor) -> tuple[float, float, float]:
    """(x, y) centroid as fractions of width/height and the area fraction (sum / cells) of a map."""
    h, w = m.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    tot = float(m.sum())
    if tot <= 0:
        return 0.5, 0.5, 0.0
    cx = float((m.to(torch.float64).sum(0) * xs).sum() / tot)
    cy = float((m.to(torch.float64).sum(1) * ys).sum() / tot)
    return cx, cy, tot / (h * w)


def level_shape(n_query: int, latent_hw: tuple[int, int], max_down: int = 6) -> tuple[int, int] | None:
    """The (h, w) grid of an attention layer with n_query positions in a UNet on a latent of latent_hw.

    Each UNet level halves the grid with a stride-2, padding-1 convolution: h -> (h + 1) // 2.
    """
    h, w = latent_hw
    for _ in range(max_down + 1):
        if h * w == n_query:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    return None


# ------------------------------------------------------------------ phrase tokens


def find_phrase_positions(rows: Sequence[Sequence[int]], phrase_ids: Sequence[int]) -> list[int]:
    """Flat token positions (row * row_length + index) of every occurrence of phrase_ids in rows.

    ``rows`` are the prompt's tokenizer rows (one per 77-token chunk for CLIP), in the order the
    encoder concatenates them into the conditioning.
    """
    n = len(phrase_ids)
    if n == 0:
        return []
    out: list[int] = []
    offset = 0
    for row in rows:
        ids = list(row)
        for i in range(len(ids) - n + 1):
            if ids[i : i + n] == list(phrase_ids):
                out.extend(range(offset + i, offset + i + n))
        offset += len(ids)
    return out


# ------------------------------------------------------------------ schedule, bias, loss


def guidance_weight(percent: float, start: float, end: float, schedule: str = "cosine") -> float:
    """Weight (0..1) at sampling progress ``percent`` (0 = first step) inside [start, end], 0 outside.

    The weight decays over the range: from 1 at ``start`` to 0 at ``end`` ("linear", "cosine") or stays 1 ("constant").
    """
    if schedule not in SCHEDULES:
        raise HighlightError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if end <= start or percent < start - 1e-9 or percent > end + 1e-9:
        return 0.0
    frac = min(max((percent - start) / (end - start), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def attention_bias(regions: torch.Tensor, token_columns: Sequence[Sequence[int]], n_keys: int, weight: float,
                   inside: float = BIAS_INSIDE, outside: float = BIAS_OUTSIDE) -> torch.Tensor:
    """Additive cross-attention bias [N, n_keys] for one grid level.

    Args:
        regions: [P, N] soft region per highlight (0..1), N = h * w of the level.
        token_columns: for each highlight, the key positions (phrase tokens) it applies to.
        n_keys: number of keys (conditioning tokens) of the layer.
        weight: strength times schedule weight; 0 gives an all-zero bias.
    Only the phrase columns are non-zero: ``weight * (inside * m - outside * (1 - m))``.
    """
    n = regions.shape[1]
    bias = torch.zeros(n, n_keys, dtype=torch.float32)
    if weight == 0:
        return bias
    for m, cols in zip(regions, token_columns):
        idx = [c for c in cols if c < n_keys]
        if not idx:
            continue
        col = weight * (inside * m - outside * (1.0 - m))
        bias[:, idx] = col[:, None].to(torch.float32)
    return bias


def phrase_attention_mass(probs: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Fraction of a phrase's attention mass inside its region.

    Args:
        probs: [..., N] attention of the phrase's tokens to each of the N pixels (softmax over keys,
            then taken for the phrase columns and summed/averaged over tokens and heads).
        region: [N] soft region (0..1).
    """
    tot = probs.sum(-1).clamp_min(1e-12)
    return (probs * region).sum(-1) / tot


def refocus_loss(probs: torch.Tensor, region: torch.Tensor, coverage_weight: float = 0.5) -> torch.Tensor:
    """Attention-refocusing loss for one phrase at one level (a scalar; 0 is best).

    ``probs`` [B, N] is the phrase's attention per pixel. Two terms, as in Attention Refocusing:
    the share of attention mass outside the region, and how unevenly the region is covered
    (1 - mean over region pixels of attention relative to its peak).
    """
    outside = 1.0 - phrase_attention_mass(probs, region)
    peak = probs.amax(-1, keepdim=True).clamp_min(1e-12)
    w = region / region.sum().clamp_min(1e-12)
    coverage = 1.0 - ((probs / peak) * w).sum(-1)
    return (outside + coverage_weight * coverage).mean()
