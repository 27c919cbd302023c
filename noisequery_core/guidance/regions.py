"""Region maps: a highlight's strokes and masks as a soft [h, w] map at any grid size, and what a map says.

The map keeps the stroke's shape and direction, unlike a bounding box, at every attention
resolution of a UNet and any aspect ratio. Distances are measured in units of the image's shorter
side so a stroke keeps its shape whatever the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import HighlightError
from .strokes import Highlight, Stroke


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


def stroke_map(stroke: Stroke, h: int, w: int, aspect: float | None = None, softness: float = 0.5) -> torch.Tensor:
    """Soft region of one stroke on an h x w grid.

    1 within half the stroke width of the polyline, then a Gaussian falloff of
    ``softness * half width``. The radius never drops below ~ half a grid cell, so a thin stroke
    still marks the cells it crosses at coarse attention resolutions.

    Args:
        stroke: the polyline (points as fractions of width / height).
        h, w: grid size.
        aspect: image width / height (default w / h).
        softness: falloff length as a fraction of the half width (0 = hard edge).
    Returns:
        [h, w] float32 in 0..1.
    """
    aspect = aspect if aspect is not None else w / h
    sx, sy = _scale(aspect)
    g = _grid(h, w, aspect)
    pts = torch.tensor(stroke.points, dtype=torch.float64) * torch.tensor([sx, sy], dtype=torch.float64)
    a, b = pts[:-1], pts[1:]  # segments
    ab = b - a
    len2 = (ab * ab).sum(1).clamp_min(1e-18)
    # distance of every grid point to every segment, min over segments
    t = (((g[:, None, :] - a[None]) * ab[None]).sum(-1) / len2[None]).clamp(0, 1)
    nearest = a[None] + t[..., None] * ab[None]
    d = (g[:, None, :] - nearest).norm(dim=-1).min(dim=1).values
    cell = max(sx / w, sy / h)
    r = max(stroke.width / 2.0, 0.5 * cell)
    sigma = max(softness * r, 0.35 * cell)
    m = torch.where(d <= r, torch.ones_like(d), torch.exp(-0.5 * ((d - r) / sigma) ** 2))
    return m.reshape(h, w).to(torch.float32)


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
    out = torch.zeros(h, w, dtype=torch.float32)
    for s in hl.strokes:
        out = torch.maximum(out, stroke_map(s, h, w, aspect, softness))
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
