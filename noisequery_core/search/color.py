"""Low-level image statistics, colour palette (see palette.py) and coarse spatial colour layout.

All features are computed on the image resized to ANALYSIS_SIZE × ANALYSIS_SIZE (area
filter), so libraries built at different resolutions stay comparable. Bump COLOR_VERSION
whenever a formula changes: libraries record it, refuse to mix versions, and
``python -m noisequery_core upgrade`` recomputes an older library's colour columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import LibraryError
from . import palette
from .colorspace import parse_hex_color as parse_hex_color  # re-exported: color.parse_hex_color
from .colorspace import srgb_to_lab as srgb_to_lab

# 1: 64-bin RGB histogram ("hist"). 2: palette + per-region shares ("palette", "palette_shares").
COLOR_VERSION = 2
ANALYSIS_SIZE = 256
GRID = 8  # layout grid is GRID × GRID cells


@dataclass(frozen=True)
class StatSpec:
    name: str
    lo: float
    hi: float
    doc: str


# Order is the column order of the `stats` column (kept in sync with README "Library format").
STATS: tuple[StatSpec, ...] = (
    StatSpec("brightness", 0.0, 1.0, "mean grey level (0.299R+0.587G+0.114B) / 255"),
    StatSpec("contrast", 0.0, 1.0, "standard deviation of grey / 127.5 (127.5 is the largest possible)"),
    StatSpec("saturation", 0.0, 1.0, "mean HSV saturation (max−min)/max"),
    StatSpec(
        "colorfulness",
        0.0,
        3.0,
        "Hasler–Süsstrunk M / 100 (≈0.33 moderately, 0.59 quite, 0.82 highly, 1.09 extremely colourful)",
    ),
    StatSpec("sharpness", 0.0, 1.0, "log10(1 + variance of the 4-neighbour Laplacian of grey 0..255) / 5"),
    StatSpec("mean_r", 0.0, 1.0, "mean red / 255"),
    StatSpec("mean_g", 0.0, 1.0, "mean green / 255"),
    StatSpec("mean_b", 0.0, 1.0, "mean blue / 255"),
)
STAT_NAMES: tuple[str, ...] = tuple(s.name for s in STATS)
STAT_INDEX = {s.name: i for i, s in enumerate(STATS)}


def _region_masks() -> dict[str, np.ndarray]:
    """Named regions as boolean GRID×GRID masks (row 0 is the top of the image)."""
    g = GRID
    h, t = g // 2, g // 3
    m: dict[str, np.ndarray] = {}

    def mk() -> np.ndarray:
        return np.zeros((g, g), dtype=bool)

    m["whole"] = np.ones((g, g), dtype=bool)
    for name, sl in {
        "top": (slice(0, h), slice(None)),
        "bottom": (slice(h, g), slice(None)),
        "left": (slice(None), slice(0, h)),
        "right": (slice(None), slice(h, g)),
        "top_left": (slice(0, h), slice(0, h)),
        "top_right": (slice(0, h), slice(h, g)),
        "bottom_left": (slice(h, g), slice(0, h)),
        "bottom_right": (slice(h, g), slice(h, g)),
        "center": (slice(g // 4, g - g // 4), slice(g // 4, g - g // 4)),
        "upper_third": (slice(0, t + 1), slice(None)),
        "lower_third": (slice(g - t - 1, g), slice(None)),
    }.items():
        a = mk()
        a[sl] = True
        m[name] = a
    border = np.ones((g, g), dtype=bool)
    border[1:-1, 1:-1] = False
    m["border"] = border
    return m


REGION_MASKS: dict[str, np.ndarray] = _region_masks()
REGION_NAMES: tuple[str, ...] = tuple(REGION_MASKS)  # "whole" first: palette_shares[:, 0] is the whole image
_REGION_STACK = np.stack(list(REGION_MASKS.values()))

# Colour columns of each colour version: (name, dtype, row shape), in storage order after "seeds".
# Kept in sync with README "Library format"; storage.columns_for adds seeds and clip around them.
COLUMNS_BY_VERSION: dict[int, tuple[tuple[str, str, tuple[int, ...]], ...]] = {
    1: (
        ("stats", "<f4", (len(STATS),)),
        ("hist", "<f2", (64,)),
        ("layout", "|u1", (GRID, GRID, 3)),
        ("regions", "<f2", (len(REGION_NAMES), 3)),
    ),
    2: (
        ("stats", "<f4", (len(STATS),)),
        ("palette", "<u2", (palette.PALETTE_SIZE, 2)),
        ("palette_shares", "|u1", (len(REGION_NAMES), palette.PALETTE_SIZE)),
        ("layout", "|u1", (GRID, GRID, 3)),
        ("regions", "<f2", (len(REGION_NAMES), 3)),
    ),
}
# The columns an upgrade to COLOR_VERSION recomputes; every other colour column is unchanged.
UPGRADED_COLUMNS: tuple[str, ...] = ("palette", "palette_shares")


def columns_of_version(version: int, where: object = "") -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Colour columns of a colour version. Raises LibraryError for a version this code does not know."""
    got = COLUMNS_BY_VERSION.get(int(version))
    if got is None:
        raise LibraryError(
            f"{where or 'The library'} has colour features v{version}, which this NoiseQuery does not know "
            f"(it reads v1..v{COLOR_VERSION}): it was written by a newer NoiseQuery. Update the NoiseQuery pack."
        )
    return got


@dataclass(frozen=True)
class ColorFeatures:
    """Features of a batch of N images (the colour columns of COLOR_VERSION)."""

    stats: np.ndarray  # float32 [N, len(STATS)]
    palette: np.ndarray  # uint16 [N, PALETTE_SIZE, 2]: (colour code, spread), see palette.py
    palette_shares: np.ndarray  # uint8 [N, len(REGION_NAMES), PALETTE_SIZE]: share × 255 per region
    layout: np.ndarray  # uint8 [N, GRID, GRID, 3]: L*·255/100, a*+128, b*+128
    regions: np.ndarray  # float16 [N, len(REGION_NAMES), 3]: mean CIELAB per named region (L 0..100)

    def columns(self) -> dict[str, np.ndarray]:
        """The library columns, by name."""
        return {name: getattr(self, name) for name, _, _ in COLUMNS_BY_VERSION[COLOR_VERSION]}


# ---------------------------------------------------------------- colour spaces
# srgb_to_lab and parse_hex_color live in colorspace.py; imported above so color.X keeps working.


def layout_to_lab(layout_u8: np.ndarray) -> np.ndarray:
    """Stored uint8 layout (…, 3) back to float CIELAB."""
    x = np.asarray(layout_u8, dtype=np.float32)
    return np.stack([x[..., 0] * (100.0 / 255.0), x[..., 1] - 128.0, x[..., 2] - 128.0], axis=-1)


def _lab_to_u8(lab: np.ndarray) -> np.ndarray:
    out = np.stack([lab[..., 0] * (255.0 / 100.0), lab[..., 1] + 128.0, lab[..., 2] + 128.0], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- extraction


def prepare(image: Image.Image | np.ndarray) -> np.ndarray:
    """Image (PIL or uint8/float HxWx3 array) to uint8 ANALYSIS_SIZE² RGB."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(np.asarray(arr, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def analyse_one(rgb_u8: np.ndarray) -> dict[str, np.ndarray]:
    """Colour columns (COLUMNS_BY_VERSION[COLOR_VERSION]) of one prepared ANALYSIS_SIZE² uint8 RGB image."""
    x = rgb_u8.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    mx = x.max(axis=-1)
    mn = x.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    rg = r - g
    yb = 0.5 * (r + g) - b
    hasler = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    stats = np.array(
        [
            grey.mean() / 255.0,
            grey.std() / 127.5,
            sat.mean(),
            hasler / 100.0,
            np.log10(1.0 + float(lap.var())) / 5.0,
            r.mean() / 255.0,
            g.mean() / 255.0,
            b.mean() / 255.0,
        ],
        dtype=np.float32,
    )
    pal = analyse_palette(rgb_u8)
    # Layout: CIELAB of an 8×8-per-cell box-filtered copy, averaged per cell (cheaper than
    # converting all ANALYSIS_SIZE² pixels, and within ~1 ΔE of it on natural images).
    small = x.reshape(GRID * 8, ANALYSIS_SIZE // (GRID * 8), GRID * 8, ANALYSIS_SIZE // (GRID * 8), 3).mean(axis=(1, 3))
    lab = srgb_to_lab(small / 255.0)
    cells = lab.reshape(GRID, 8, GRID, 8, 3).mean(axis=(1, 3))  # [GRID, GRID, 3]
    regions = np.stack([cells[m].mean(axis=0) for m in REGION_MASKS.values()])
    return {
        "stats": stats,
        **pal,
        "layout": _lab_to_u8(cells),
        "regions": regions.astype(np.float16),
    }


def analyse_palette(rgb_u8: np.ndarray) -> dict[str, np.ndarray]:
    """The UPGRADED_COLUMNS of one prepared image: its palette and each named region's shares of it."""
    pal, shares = palette.extract(rgb_u8, _REGION_STACK)
    return {"palette": pal, "palette_shares": shares}


def analyse(images: list[Image.Image | np.ndarray]) -> ColorFeatures:
    """Colour features for a batch of images (PIL or HxWx3 arrays, uint8 or float 0..1)."""
    parts = [analyse_one(prepare(im)) for im in images]
    cols = {
        name: np.stack([p[name] for p in parts]) if parts else np.zeros((0, *shape), dtype)
        for name, dtype, shape in COLUMNS_BY_VERSION[COLOR_VERSION]
    }
    return ColorFeatures(**cols)


EXAMPLE_PALETTE_MIN_SHARE = 0.05  # an example image's palette colours below this share of it are left out


def example_targets(image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[tuple[str, float], ...]]:
    """An example image as query targets, analysed as a library entry is: (its uint8 [GRID, GRID, 3] colour layout,
    its palette as ('#RRGGBB', share) pairs of at least EXAMPLE_PALETTE_MIN_SHARE, largest first)."""
    feats = analyse([image])
    colours = palette.colours_of(feats.palette[0], feats.palette_shares[0][0], EXAMPLE_PALETTE_MIN_SHARE)
    return feats.layout[0], tuple(colours)
