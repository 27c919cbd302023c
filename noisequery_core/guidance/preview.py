"""What a guide shows its user: each phrase's soft region drawn in its colour, and a line per phrase."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..errors import QueryError
from ..search.color import parse_hex_color
from .regions import highlight_map, map_centroid_and_area
from .strokes import Highlight

log = logging.getLogger("noisequery")

# Region colours for phrases whose strokes carry no colour (masks); the widget has its own palette per phrase.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
# How much a region's colour covers what is under it, at the region's core.
OPACITY = 0.75
BACKGROUND_DIM = 0.6
BACKGROUND_GREY = 0.08
# The preview is a quarter of the image, at most this long on its longer side: a 16384 px image would otherwise
# blend 4096 x 4096 maps per phrase (its region maps are computed at most 128 cells wide: regions.MAX_MAP_SIDE).
PREVIEW_MAX_SIDE = 512


def preview_shape(width: int, height: int) -> tuple[int, int]:
    """(h, w) of the regions preview of a width x height image: a quarter of it, at most PREVIEW_MAX_SIDE long."""
    w, h = max(8, width // 4), max(8, height // 4)
    scale = min(1.0, PREVIEW_MAX_SIDE / max(w, h))
    return max(8, round(h * scale)), max(8, round(w * scale))


def highlight_rgb(hl: Highlight, index: int) -> tuple[float, float, float]:
    """A highlight's colour in 0..1: its first stroke's widget colour ("#rrggbb"), else PALETTE[index]."""
    for s in hl.strokes:
        if s.color:
            try:
                r, g, b = (float(c) for c in parse_hex_color(s.color))
                return r, g, b
            except QueryError:
                # The colour only decorates the preview: one the widget did not write falls back to the palette.
                log.debug("stroke colour %r of '%s' is not #rrggbb; using the palette", s.color, hl.phrase)
                break
    r8, g8, b8 = PALETTE[index % len(PALETTE)]
    return r8 / 255.0, g8 / 255.0, b8 / 255.0


def region_preview(highlights: Sequence[Highlight], width: int, height: int, softness: float,
                   background: torch.Tensor | None = None) -> torch.Tensor:
    """Each phrase's soft region in its colour, at a quarter of the image size (at least 8 x 8, at most
    PREVIEW_MAX_SIDE on the longer side: preview_shape).

    Args:
        highlights: the phrases and regions, in order (the index picks the palette colour).
        width, height: image size in pixels.
        softness: as in regions.stroke_map.
        background: optional [B, H, W, C] image in 0..1 (its first item is dimmed and drawn under
            the regions); any size, resampled.
    Returns:
        [1, h, w, 3] float32 in 0..1, on the CPU; (h, w) = preview_shape(width, height).
    """
    h, w = preview_shape(width, height)
    if background is not None:
        bg = background[:1, ..., :3].detach().cpu().float().movedim(-1, 1)
        base = torch.nn.functional.interpolate(bg, size=(h, w), mode="bilinear", align_corners=False)[0].movedim(0, -1)
        base = base * BACKGROUND_DIM
    else:
        base = torch.full((h, w, 3), BACKGROUND_GREY)
    out = base.clone()
    for i, hl in enumerate(highlights):
        m = highlight_map(hl, h, w, width / height, softness)[..., None]
        col = torch.tensor(highlight_rgb(hl, i), dtype=torch.float32)
        out = out * (1 - OPACITY * m) + col * OPACITY * m
    return out.clamp(0, 1)[None]


def summary_lines(highlights: Sequence[Highlight], token_columns: Sequence[Sequence[int]], width: int, height: int,
                  softness: float) -> list[str]:
    """One line per phrase: what it is made of, its token positions, the centre and area of its region.

    Args:
        highlights: the phrases and regions.
        token_columns: per phrase its token positions (tokens.phrase_token_columns).
        width, height: image size (sets the aspect of the 64-high grid the region is measured on).
        softness: as in regions.stroke_map.
    """
    lines = []
    for hl, cols in zip(highlights, token_columns):
        grid = highlight_map(hl, 64, max(8, round(64 * width / height)), width / height, softness)
        cx, cy, area = map_centroid_and_area(grid)
        shown = list(cols[:8])
        lines.append(f"{hl.describe()}: tokens {shown}{'...' if len(cols) > 8 else ''}, centre "
                     f"({cx:.2f}, {cy:.2f}), {area * 100:.0f}% of the image")
    return lines
