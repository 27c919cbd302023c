"""Region maps: a highlight's strokes and masks as a soft [h, w] map at any grid size, and what a map says.

The map keeps the stroke's shape and direction, unlike a bounding box, at every attention
resolution of a UNet and any aspect ratio. Distances are measured in units of the image's shorter
side so a stroke keeps its shape whatever the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import HighlightError
from .strokes import Highlight, Stroke

# Region maps are computed on at most MAX_MAP_SIDE cells per side and resized beyond: every attention level of an
# SD1.x image up to 1024 px and an SDXL one up to 2048 px is exact (previews are smaller still: preview.py).
MAX_MAP_SIDE = 128
# A map value below exp(-E_CUT^2 / 2) (1.5e-8) is 0, and a block of cells over which the map provably varies by
# less than MAP_TOLERANCE is interpolated from its corners: every value is within MAP_TOLERANCE of the exact one
# (and far closer in practice), and the flat parts of soft strokes cost a few blocks instead of every cell.
E_CUT = 6.0
MAP_TOLERANCE = 0.01
PAIR_CHUNK = 1 << 18  # (block, segment) distances computed at once: bounds the working memory (~100 MB)
# Stroke points closer than this many grid cells to the previous one are dropped before a map is computed
# (distances move by less than that: invisible, and a dense stroke on a coarse grid costs what a simple one does).
THIN_CELLS = 0.02


def _scale(aspect: float) -> tuple[float, float]:
    """(x, y) extent of the image in 'shorter side' units."""
    return (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)


def _grid(h: int, w: int, aspect: float) -> torch.Tensor:
    """Pixel centres of an h x w grid in 'shorter side' units: [h*w, 2] (x, y)."""
    sx, sy = _scale(aspect)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * sy
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * sx
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def _units(h: int, w: int, aspect: float | None) -> tuple[float, float, float]:
    """(sx, sy, cell): the grid's extent in 'shorter side' units and its larger cell side."""
    sx, sy = _scale(aspect if aspect is not None else w / h)
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
    """A [H, W] mask resampled to [h, w] (area average when shrinking, bilinear when growing), clamped to 0..1."""
    m = mask.to(torch.float32)[None, None]
    mode = "area" if (h <= m.shape[-2] and w <= m.shape[-1]) else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return torch.nn.functional.interpolate(m, size=(h, w), mode=mode, **kwargs)[0, 0].clamp(0, 1)


def highlight_map(hl: Highlight, h: int, w: int, aspect: float | None = None, softness: float = 0.5) -> torch.Tensor:
    """The union (max) of a highlight's strokes and masks on an h x w grid: [h, w] float32 in 0..1.

    ``aspect`` and ``softness`` as in stroke_map.
    """
    out = strokes_map(hl.strokes, h, w, aspect, softness)
    for m in hl.masks:
        out = torch.maximum(out, resize_mask(m, h, w))
    return out


def region_stack(highlights: Sequence[Highlight], h: int, w: int, aspect: float, softness: float) -> torch.Tensor:
    """Every highlight's map on one grid, flattened: [P, h*w] float32 (the layout attention works in)."""
    return torch.stack([highlight_map(hl, h, w, aspect, softness).reshape(-1) for hl in highlights])


def phrase_boxes(highlights: Sequence[Highlight], width: int, height: int, softness: float
                 ) -> list[tuple[int, int, int, int]]:
    """Each highlight's bounding box in latent cells (an 8-pixel grid), where its region map is >= 0.5.

    Args:
        highlights: the phrases and their regions.
        width, height: image size in pixels.
        softness: as in stroke_map.
    Returns:
        One (h, w, y, x) per highlight: size and top-left corner in latent cells, the order GLIGEN's
        position entries use.
    Raises:
        HighlightError: a region has no cell >= 0.5 at this size.
    """
    lh, lw = max(height // 8, 1), max(width // 8, 1)
    boxes = []
    for hl in highlights:
        m = highlight_map(hl, lh, lw, width / height, softness) >= 0.5
        rows, cols = torch.nonzero(m.any(1)).reshape(-1), torch.nonzero(m.any(0)).reshape(-1)
        if rows.numel() == 0:
            raise HighlightError(f"the region of '{hl.phrase}' is empty at {width}x{height} (no latent cell is at "
                                 "least half inside it): draw a wider stroke or paint a larger mask")
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        boxes.append((y1 - y0, x1 - x0, y0, x0))
    return boxes


def principal_axis_degrees(m: torch.Tensor, aspect: float | None = None) -> float:
    """Orientation of a map's principal axis in degrees in [0, 180), x right / y down, in image units.

    ``aspect`` is the image's width / height (default the map's own).
    """
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
    """(x, y) centroid as fractions of width/height and the area fraction (sum / cells) of a [h, w] map.

    An all-zero map gives (0.5, 0.5, 0.0).
    """
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
    Returns None when no level down to ``max_down`` halvings has n_query positions.
    """
    h, w = latent_hw
    for _ in range(max_down + 1):
        if h * w == n_query:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    return None
