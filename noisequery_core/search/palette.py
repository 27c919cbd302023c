"""Per-image colour palettes and the "how much of the image is this colour" score.

Each image is summarised by PALETTE_SIZE colours (deterministic weighted k-means in CIELAB) with
their spread, plus the share of every named region's pixels that each palette colour holds.
A colour term asks what fraction of the pixels lies within CIEDE2000 < THRESHOLD of a target:
each palette colour contributes its share times a soft step of its distance to the target,
whose width follows the colour's spread (a wide cluster straddling the threshold is partly in).

Storage, one row per image (columns ``palette`` and ``palette_shares``, see storage.columns_for):

    palette         uint16 [PALETTE_SIZE, 2]   (colour code, spread in tenths of ΔE)
    palette_shares  uint8  [regions, PALETTE_SIZE]   share of the region's pixels × 255

A colour code indexes the sRGB grid with CODE_LEVELS levels per channel, so a query evaluates
CIEDE2000 once per code (a lookup table) and the scan is PALETTE_SIZE gathers per row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .colorspace import ciede2000, lab_to_srgb, srgb_to_lab
from .mapped import release_pages, transposed

PALETTE_SIZE = 8
CODE_LEVELS = 32  # per sRGB channel: codes are r·32² + g·32 + b, cell width 8/255
CODES = CODE_LEVELS**3
THRESHOLD = 20.0  # CIEDE2000 radius of "this colour" (a clearly different colour lies beyond it)
KMEANS_ITERS = 12
# Soft step width = SPREAD_FACTOR · spread, kept within [MIN_WIDTH, MAX_WIDTH]; quantised to
# WIDTH_LEVELS widths so the lookup table stays small (CODES × WIDTH_LEVELS floats).
SPREAD_FACTOR = 0.5
MIN_WIDTH = 1.0
MAX_WIDTH = 8.0
WIDTH_LEVELS = 8
SPREAD_SCALE = 10.0  # stored spread = round(spread ΔE × SPREAD_SCALE)
_SCAN_CHUNK = 1 << 16  # rows per block of the scan: the temporaries stay in cache

_SHIFT = 8 - (CODE_LEVELS.bit_length() - 1)  # uint8 channel → code level
CODEBOOK_LAB: np.ndarray = srgb_to_lab(
    (np.stack(np.meshgrid(*[np.arange(CODE_LEVELS)] * 3, indexing="ij"), axis=-1).reshape(-1, 3) + 0.5) / CODE_LEVELS
)  # float32 [CODES, 3]: CIELAB of each code's cell centre


def codes_of(rgb_u8: np.ndarray) -> np.ndarray:
    """Colour code of every pixel of a uint8 RGB array (…, 3) → int32 (…)."""
    q = (np.asarray(rgb_u8, dtype=np.uint8) >> _SHIFT).astype(np.int32)
    return (q[..., 0] * CODE_LEVELS + q[..., 1]) * CODE_LEVELS + q[..., 2]


def code_of_lab(lab: np.ndarray) -> np.ndarray:
    """Code of the grid cell that holds each CIELAB colour (…, 3) after clipping it into sRGB."""
    rgb = np.clip(np.floor(lab_to_srgb(lab) * CODE_LEVELS), 0, CODE_LEVELS - 1).astype(np.int32)
    return (rgb[..., 0] * CODE_LEVELS + rgb[..., 1]) * CODE_LEVELS + rgb[..., 2]


def _kmeans(points: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means (squared CIELAB distance); deterministic farthest-first start.

    Returns (centres [≤k, 3], label per point). Fewer than k centres when the points run out.
    """
    # Channels as separate columns: squared distances as three broadcast terms, no reduction over a
    # length-3 axis (slow in numpy) and no BLAS (whose rounding may differ between machines).
    x = [np.ascontiguousarray(points[:, ch]) for ch in range(3)]

    def sq_dist(c: np.ndarray) -> np.ndarray:  # [P, len(c)]
        d = (x[0][:, None] - c[None, :, 0]) ** 2
        d += (x[1][:, None] - c[None, :, 1]) ** 2
        d += (x[2][:, None] - c[None, :, 2]) ** 2
        return d

    first = int(np.argmax(weights))
    centres = [points[first]]
    d2 = sq_dist(points[first][None])[:, 0]
    for _ in range(1, k):
        # The heaviest point far from every centre so far (k-means++ without the dice).
        i = int(np.argmax(weights * d2))
        if d2[i] <= 0:
            break
        centres.append(points[i])
        d2 = np.minimum(d2, sq_dist(points[i][None])[:, 0])
    c = np.stack(centres).astype(np.float64)
    labels = np.zeros(len(points), np.int64)
    for it in range(KMEANS_ITERS):
        new = sq_dist(c).argmin(axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        mass = np.bincount(labels, weights=weights, minlength=len(c))
        keep = mass > 0  # an emptied centre stays where it was (it then holds no share)
        for ch in range(3):
            s = np.bincount(labels, weights=weights * x[ch], minlength=len(c))
            c[keep, ch] = s[keep] / mass[keep]
    return c, labels


def extract(rgb_u8: np.ndarray, region_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Palette of one image and each region's shares of it.

    Args:
        rgb_u8: uint8 [H, W, 3] image (the analysis copy, see color.prepare).
        region_masks: bool [R, G, G]: named regions on a G×G grid of equal cells (H, W divisible by G).
    Returns:
        (palette uint16 [PALETTE_SIZE, 2] as (code, spread×SPREAD_SCALE), shares uint8 [R, PALETTE_SIZE]),
        palette colours ordered by their share of the whole image, unused slots with share 0.
    """
    h, w = rgb_u8.shape[:2]
    g = region_masks.shape[-1]
    codes = codes_of(rgb_u8)
    counts = np.bincount(codes.ravel(), minlength=CODES)
    present = np.nonzero(counts)[0]
    weights = counts[present].astype(np.float64)
    points = CODEBOOK_LAB[present].astype(np.float64)
    centres, labels = _kmeans(points, weights, PALETTE_SIZE)
    k = len(centres)
    mass = np.bincount(labels, weights=weights, minlength=k)
    sq = ((points - centres[labels]) ** 2).sum(axis=1)
    spread = np.sqrt(np.bincount(labels, weights=weights * sq, minlength=k) / np.maximum(mass, 1e-9))
    order = np.argsort(-mass, kind="stable")

    # Region shares: every pixel takes its code's cluster; count pixels per (grid cell, cluster).
    label_of_code = np.zeros(CODES, np.int64)
    label_of_code[present] = labels
    cell = (np.arange(h)[:, None] * g // h) * g + (np.arange(w)[None, :] * g // w)
    per_cell = np.bincount((cell * k + label_of_code[codes]).ravel(), minlength=g * g * k).reshape(g * g, k)
    masks = region_masks.reshape(len(region_masks), g * g).astype(np.float64)
    region_counts = masks @ per_cell  # [R, k]; sums of whole counts, exact in any order
    shares = region_counts / np.maximum(region_counts.sum(axis=1, keepdims=True), 1.0)

    palette = np.zeros((PALETTE_SIZE, 2), np.uint16)
    out_shares = np.zeros((len(region_masks), PALETTE_SIZE), np.uint8)
    palette[:k, 0] = code_of_lab(centres[order])
    palette[:k, 1] = np.clip(np.rint(spread[order] * SPREAD_SCALE), 0, 65535)
    out_shares[:, :k] = np.clip(np.rint(shares[:, order] * 255), 0, 255)
    return palette, out_shares


def colours_of(palette_row: np.ndarray, shares_row: np.ndarray, min_share: float = 0.05) -> list[tuple[str, float]]:
    """An image's palette as ('#RRGGBB', share of the region) pairs, largest first, those under ``min_share`` left out.

    palette_row: uint16 [PALETTE_SIZE, 2] as ``extract`` writes it; shares_row: uint8 [PALETTE_SIZE] (one region's).
    The colour is its code's cell centre (within 4/255 per channel of the cluster's centre).
    """
    out = []
    for (code, _), share in zip(np.asarray(palette_row), np.asarray(shares_row)):
        frac = float(share) / 255.0
        if frac < min_share or frac <= 0.0:
            continue
        c = int(code)
        levels = (c // (CODE_LEVELS * CODE_LEVELS), (c // CODE_LEVELS) % CODE_LEVELS, c % CODE_LEVELS)
        out.append(("#" + "".join(f"{round((v + 0.5) * 255 / CODE_LEVELS):02x}" for v in levels), frac))
    return sorted(out, key=lambda x: -x[1])


def damaged_rows(palette_rows: np.ndarray, shares_rows: np.ndarray) -> np.ndarray:
    """bool [N]: rows whose codes are out of range or whose region shares do not sum to 1 (rounding allowed)."""
    pal = np.asarray(palette_rows)
    sums = np.asarray(shares_rows, dtype=np.int64).sum(axis=-1)  # [N, R], 255 each up to per-entry rounding
    bad_sums = (np.abs(sums - 255) > (PALETTE_SIZE + 1) // 2).any(axis=-1)
    return bad_sums | (pal[..., 0] >= CODES).any(axis=-1)


def width_level(spread_stored: np.ndarray) -> np.ndarray:
    """Stored spread → index of its soft-step width (0..WIDTH_LEVELS-1)."""
    width = np.clip(SPREAD_FACTOR * np.asarray(spread_stored, np.float32) / SPREAD_SCALE, MIN_WIDTH, MAX_WIDTH)
    return np.rint((width - MIN_WIDTH) / (MAX_WIDTH - MIN_WIDTH) * (WIDTH_LEVELS - 1)).astype(np.int64)


_WIDTHS = MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * np.arange(WIDTH_LEVELS) / (WIDTH_LEVELS - 1)


@functools.lru_cache(maxsize=64)
def _kernel_cached(target: tuple[float, float, float]) -> np.ndarray:
    d = ciede2000(CODEBOOK_LAB, np.asarray(target, np.float64))  # [CODES]
    z = (THRESHOLD - d[:, None]) / _WIDTHS[None, :]
    k = 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))
    out = k.astype(np.float32).reshape(-1)  # index = code · WIDTH_LEVELS + width level
    out.flags.writeable = False
    return out


def colour_kernel(target_lab: np.ndarray) -> np.ndarray:
    """Lookup table float32 [CODES · WIDTH_LEVELS]: the part of a palette colour (code, width) within THRESHOLD of the target."""
    t = np.asarray(target_lab, np.float32).reshape(3)
    return _kernel_cached((float(t[0]), float(t[1]), float(t[2])))


class PaletteColumns:
    """Column-major copy of a library's palette columns, laid out for the scan.

    The lookup-table index of every palette colour is built at once (32 B per entry); a region's
    shares are transposed on its first use (8 B per entry and region), so a library queried only
    by whole-image colour holds 40 B per entry in RAM.
    """

    _CHUNK = 1 << 18  # rows per step when reading the (memory-mapped) row-major columns

    def __init__(self, index: np.ndarray, shares_rows: np.ndarray):
        self.index = index  # int32 [PALETTE_SIZE, N]: code · WIDTH_LEVELS + width level (a lookup-table index)
        self._shares_rows = shares_rows  # uint8 [N, R, PALETTE_SIZE], row-major as stored
        self._shares: dict[int, np.ndarray] = {}

    @property
    def count(self) -> int:
        return int(self.index.shape[1])

    @property
    def nbytes(self) -> int:
        """RAM held: the index and the regions transposed so far."""
        return int(self.index.nbytes + sum(a.nbytes for a in self._shares.values()))

    @classmethod
    def from_rows(cls, palette: np.ndarray, shares: np.ndarray) -> PaletteColumns:
        """From the stored row-major columns (memory maps are read in chunks; ``shares`` is kept as given)."""
        n = len(palette)
        index = np.empty((PALETTE_SIZE, n), np.int32)  # as fast to gather with as intp, half the RAM
        for s in range(0, n, cls._CHUNK):
            p = np.asarray(palette[s : s + cls._CHUNK])
            index[:, s : s + len(p)] = (p[..., 0].astype(np.int32) * WIDTH_LEVELS + width_level(p[..., 1])).T
        release_pages(palette)  # read once: the scan uses ``index``
        return cls(index, shares)

    def shares(self, region: int) -> np.ndarray:
        """uint8 [PALETTE_SIZE, N]: share × 255 of each palette colour in the region."""
        got = self._shares.get(region)
        if got is None:
            got = self._shares[region] = transposed(self._shares_rows, (region,), chunk=self._CHUNK)
        return got


def colour_share_scores(
    columns: PaletteColumns, target_lab: np.ndarray, *, region: int = 0, rows: np.ndarray | None = None
) -> np.ndarray:
    """Estimated fraction of each image's (region's) pixels within CIEDE2000 < THRESHOLD of ``target_lab``.

    Args:
        columns: the library's palette columns (PaletteColumns.from_rows).
        target_lab: CIELAB target colour [3].
        region: index into the stored regions (0 = the whole image; color.REGION_NAMES order).
        rows: row indices to score, or None for every row.
    Returns:
        float32 [N or len(rows)] in 0..1.
    """
    lut = colour_kernel(target_lab)
    index = columns.index if rows is None else columns.index[:, rows]
    shares = columns.shares(region) if rows is None else columns.shares(region)[:, rows]
    n = index.shape[1]
    out = np.zeros(n, np.float32)
    tmp = np.empty(min(n, _SCAN_CHUNK), np.float32)
    for s in range(0, n, _SCAN_CHUNK):
        e = min(n, s + _SCAN_CHUNK)
        acc, t = out[s:e], tmp[: e - s]
        for k in range(PALETTE_SIZE):
            # mode="wrap" skips numpy's bounds check: the library's indices are < len(lut), and a damaged
            # file's (codes ≥ CODES, which verify reports) wrap to a wrong score instead of raising.
            np.take(lut, index[k, s:e], out=t, mode="wrap")
            t *= shares[k, s:e]
            acc += t
    out *= np.float32(1.0 / 255.0)
    return out


def colour_mix_scores(
    columns: PaletteColumns,
    targets_lab: Sequence[np.ndarray],
    proportions: Sequence[float],
    *,
    region: int = 0,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """How well each image (region) holds a mix of colours, e.g. 2:1 for "mostly orange, some blue".

    Σ over the targets of min(share of the target, its proportion), proportions scaled to sum
    to 1 (a histogram intersection): 1 when every colour covers at least its part, and an image
    of one colour only scores that colour's proportion. With one target it is its share.
    Returns float32 [N or len(rows)] in 0..1.
    """
    p = np.asarray(proportions, np.float64)
    if len(p) != len(targets_lab) or not len(p) or (p <= 0).any():
        raise ValueError("colour_mix_scores needs one positive proportion per target colour")
    p = p / p.sum()
    out: np.ndarray | None = None
    for target, share in zip(targets_lab, p):
        part = np.minimum(colour_share_scores(columns, target, region=region, rows=rows), np.float32(share))
        out = part if out is None else out + part
    assert out is not None
    return out

