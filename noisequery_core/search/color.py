"""Low-level image statistics, colour histogram and coarse spatial colour layout.

All features are computed on the image resized to ANALYSIS_SIZE × ANALYSIS_SIZE (area
filter), so libraries built at different resolutions stay comparable. Bump COLOR_VERSION
whenever a formula changes: libraries record it and refuse to mix versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import QueryError

COLOR_VERSION = 1
ANALYSIS_SIZE = 256
GRID = 8  # layout grid is GRID × GRID cells
HIST_LEVELS = 4  # RGB histogram has HIST_LEVELS³ bins
HIST_BINS = HIST_LEVELS**3


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
REGION_NAMES: tuple[str, ...] = tuple(REGION_MASKS)


@dataclass(frozen=True)
class ColorFeatures:
    """Features of a batch of N images."""

    stats: np.ndarray  # float32 [N, len(STATS)]
    hist: np.ndarray  # float16 [N, HIST_BINS], sums to 1 per row
    layout: np.ndarray  # uint8 [N, GRID, GRID, 3]: L*·255/100, a*+128, b*+128
    regions: np.ndarray  # float16 [N, len(REGION_NAMES), 3]: mean CIELAB per named region (L 0..100)


# ---------------------------------------------------------------- colour spaces


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 (any leading shape, last axis 3) to CIELAB (D65): L 0..100, a/b about −128..127."""
    rgb = np.asarray(rgb, dtype=np.float32)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        dtype=np.float32,
    )
    xyz = (lin @ m.T) / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    eps = 216 / 24389
    kappa = 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1).astype(np.float32)


def parse_hex_color(text: str) -> np.ndarray:
    """'#RRGGBB', 'RRGGBB' or '#RGB' to float32 RGB in 0..1. Raises QueryError."""
    s = str(text).strip()
    body = s[1:] if s.startswith("#") else s
    if len(body) == 3:
        body = "".join(ch * 2 for ch in body)
    if len(body) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in body):
        raise QueryError(f"Colour {text!r} is not a hex colour: write it as '#RRGGBB', e.g. '#FF8800'.")
    return np.array([int(body[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32) / 255.0


def layout_to_lab(layout_u8: np.ndarray) -> np.ndarray:
    """Stored uint8 layout (…, 3) back to float CIELAB."""
    x = np.asarray(layout_u8, dtype=np.float32)
    return np.stack([x[..., 0] * (100.0 / 255.0), x[..., 1] - 128.0, x[..., 2] - 128.0], axis=-1)


def _lab_to_u8(lab: np.ndarray) -> np.ndarray:
    out = np.stack([lab[..., 0] * (255.0 / 100.0), lab[..., 1] + 128.0, lab[..., 2] + 128.0], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


HIST_CENTERS_LAB: np.ndarray = srgb_to_lab(
    (np.stack(np.meshgrid(*[np.arange(HIST_LEVELS)] * 3, indexing="ij"), axis=-1).reshape(-1, 3) + 0.5) / HIST_LEVELS
)  # [HIST_BINS, 3]; bin index = r*L² + g*L + b


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


def analyse_one(rgb_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features of one prepared ANALYSIS_SIZE² uint8 RGB image: (stats, hist, layout_u8, regions)."""
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
    q = (rgb_u8 // (256 // HIST_LEVELS)).astype(np.int32)
    idx = (q[..., 0] * HIST_LEVELS + q[..., 1]) * HIST_LEVELS + q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=HIST_BINS).astype(np.float32)
    hist /= hist.sum()
    # Layout: CIELAB of an 8×8-per-cell box-filtered copy, averaged per cell (cheaper than
    # converting all ANALYSIS_SIZE² pixels, and within ~1 ΔE of it on natural images).
    small = x.reshape(GRID * 8, ANALYSIS_SIZE // (GRID * 8), GRID * 8, ANALYSIS_SIZE // (GRID * 8), 3).mean(axis=(1, 3))
    lab = srgb_to_lab(small / 255.0)
    cells = lab.reshape(GRID, 8, GRID, 8, 3).mean(axis=(1, 3))  # [GRID, GRID, 3]
    regions = np.stack([cells[m].mean(axis=0) for m in REGION_MASKS.values()])
    return stats, hist.astype(np.float16), _lab_to_u8(cells), regions.astype(np.float16)


def analyse(images: list[Image.Image | np.ndarray]) -> ColorFeatures:
    """Colour features for a batch of images (PIL or HxWx3 arrays, uint8 or float 0..1)."""
    parts = [analyse_one(prepare(im)) for im in images]
    if not parts:
        return ColorFeatures(
            stats=np.zeros((0, len(STATS)), np.float32),
            hist=np.zeros((0, HIST_BINS), np.float16),
            layout=np.zeros((0, GRID, GRID, 3), np.uint8),
            regions=np.zeros((0, len(REGION_NAMES), 3), np.float16),
        )
    return ColorFeatures(
        stats=np.stack([p[0] for p in parts]),
        hist=np.stack([p[1] for p in parts]),
        layout=np.stack([p[2] for p in parts]),
        regions=np.stack([p[3] for p in parts]),
    )


def color_kernel(rgb: np.ndarray, sigma: float = 25.0) -> np.ndarray:
    """Weights over histogram bins: how close each bin centre is to ``rgb`` (ΔE76 Gaussian, σ in ΔE)."""
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float32))
    d2 = ((HIST_CENTERS_LAB - lab) ** 2).sum(axis=-1)
    w = np.exp(-d2 / (2.0 * sigma * sigma)).astype(np.float32)
    return w
