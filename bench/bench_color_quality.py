"""Colour-query retrieval quality on natural photographs: colour version 1 (histogram) vs 2 (palette).

Data: crops of the colour photographs bundled with scikit-image (no download), at random
positions and scales (fixed seed); every second crop is hue-rotated by a random angle (HSV), so
the targets find images all around the colour wheel. Larger crops are box-downscaled to at most
``--max-side`` pixels: each crop is then one "photograph" at its own full resolution.

Oracle: the fraction of a crop's pixels (of a region's pixels, for region queries) whose
CIEDE2000 distance to the target is below 20 (skimage.color.deltaE_ciede2000), at full
resolution; computed once per distinct colour of the crop, which gives the same number.
A region's pixels are those whose centre falls in the region's cells of color.REGION_MASKS.

Ours: the features the library stores, computed by the library's own code (``FeatureExtractor``,
the path an import takes), scored by the function the colour term calls
(``palette.colour_share_scores``); "v2 thumb" recomputes them from the 256 px WebP thumbnail,
as ``upgrade`` does without ``--images``. v1 is the previous representation, reproduced below
exactly as colour version 1 computed and scored it (64-bin RGB histogram with a ΔE76 Gaussian
kernel; a region colour as the negative ΔE76 to the region's mean colour).

Per target: quality ratio = mean oracle score of our top-k ÷ mean oracle score of the oracle's
top-k (1.0 is the best possible), precision@k = overlap of the two top-k sets ÷ k. Two-colour
mixes (2 : 1, "mostly orange, some blue") use the oracle Σ min(fraction of each colour, its
proportion); v1 combined them as its Searcher did (weighted sum of z-scored colour terms).
Targets: quality ratio mean ≥ 0.95 and every colour ≥ 0.85 (whole image), region queries ≥ 0.90.

    .venv/bin/python bench/bench_color_quality.py              # 560 crops, ~3 min the first time (oracle cached)
    .venv/bin/python bench/bench_color_quality.py --quick      # 140 crops
    .venv/bin/python bench/bench_color_quality.py --speed 1000000   # plus the colour scan at 1M synthetic rows
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from noisequery_core.library.manifest import FeatureSet  # noqa: E402
from noisequery_core.library.storage import encode_thumbnail  # noqa: E402
from noisequery_core.search import color, palette  # noqa: E402
from noisequery_core.search.features import FeatureExtractor  # noqa: E402

# Colour photographs bundled with scikit-image (skimage.data; chelsea == cat, so only one of them).
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
TARGETS: dict[str, str] = {
    "orange": "#FF8800",
    "brown": "#8B4513",
    "mid-grey": "#808080",
    "dark green": "#1E5A1E",
    "forest green": "#228B22",
    "olive": "#808000",
    "red": "#DC1414",
    "yellow": "#FFD700",
    "blue": "#1E50C8",
    "navy": "#1A237E",
    "sky blue": "#87CEEB",
    "teal": "#008080",
    "cyan": "#00B4C8",
    "purple": "#800080",
    "magenta": "#E040E0",
    "pastel pink": "#FFC0CB",
    "pastel mint": "#B2F2BB",
    "lavender": "#C8B4E6",
    "beige": "#E0B090",
    "black": "#101010",
    "white": "#F5F5F5",
}
REGIONS = ("whole", "top", "bottom", "center", "left")
# Two-colour mixes, 2 : 1 ("mostly orange, some blue"); oracle Σ min(fraction of colour c, its proportion).
MIXES = (("orange", "blue"), ("brown", "sky blue"), ("dark green", "white"), ("mid-grey", "yellow"),
         ("purple", "pastel pink"), ("teal", "beige"))
THRESHOLD = 20.0  # the oracle's CIEDE2000 radius (the same as palette.THRESHOLD, on purpose)
ORACLE_VERSION = 1  # bump when the crop or oracle recipe changes (invalidates the cache)


# ----------------------------------------------------------------------------- data


def make_crops(per_photo: int, seed: int = 0, max_side: int = 384, photos: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """uint8 RGB crops: random position, scale and aspect; every second one hue-rotated (fixed seed)."""
    import skimage.data
    from skimage import color as skcolor

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for name in photos:
        im = np.asarray(getattr(skimage.data, name)())[..., :3]
        h_img, w_img = im.shape[:2]
        for i in range(per_photo):
            s = rng.uniform(0.15, 0.7)
            h = min(h_img, int(max(32, s * h_img * rng.uniform(0.7, 1.3))))
            w = min(w_img, int(max(32, s * w_img * rng.uniform(0.7, 1.3))))
            y = int(rng.integers(0, h_img - h + 1))
            x = int(rng.integers(0, w_img - w + 1))
            crop = im[y : y + h, x : x + w]
            if max(h, w) > max_side:
                f = max_side / max(h, w)
                size = (max(1, round(w * f)), max(1, round(h * f)))
                crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX))
            shift = rng.uniform(0.0, 1.0)  # drawn for every crop so the sequence does not depend on parity
            if i % 2 == 1:
                hsv = skcolor.rgb2hsv(crop)
                hsv[..., 0] = (hsv[..., 0] + shift) % 1.0
                crop = np.clip(np.rint(skcolor.hsv2rgb(hsv) * 255.0), 0, 255).astype(np.uint8)
            out.append(np.ascontiguousarray(crop))
    return out


def region_pixels(crop: np.ndarray, region: str) -> np.ndarray:
    """The crop's pixels [P, 3] whose centres fall in the region's cells of color.REGION_MASKS."""
    h, w = crop.shape[:2]
    g = color.GRID
    cy = ((np.arange(h) + 0.5) * g / h).astype(int)
    cx = ((np.arange(w) + 0.5) * g / w).astype(int)
    mask = color.REGION_MASKS[region][cy[:, None], cx[None, :]]
    return crop[mask]


def oracle(crops: list[np.ndarray], targets: dict[str, str], regions: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Fraction of pixels within CIEDE2000 < THRESHOLD of each target: {region: [n crops, n targets]}."""
    from skimage import color as skcolor

    t_lab = np.stack([skcolor.rgb2lab(color.parse_hex_color(h).astype(np.float64)[None, None])[0, 0] for h in targets.values()])
    out = {r: np.zeros((len(crops), len(targets))) for r in regions}
    for i, crop in enumerate(crops):
        for r in regions:
            px = region_pixels(crop, r).astype(np.uint32)
            packed = (px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]
            uniq, counts = np.unique(packed, return_counts=True)
            rgb = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=-1).astype(np.float64) / 255.0
            lab = skcolor.rgb2lab(rgb[None])[0]  # [U, 3]; per-pixel, so distinct colours give the same fractions
            d = skcolor.deltaE_ciede2000(lab[:, None, :], t_lab[None, :, :])  # [U, T]
            out[r][i] = (counts[:, None] * (d < THRESHOLD)).sum(axis=0) / counts.sum()
    return out


def cached_oracle(crops: list[np.ndarray], params: dict[str, Any], cache_dir: Path) -> dict[str, np.ndarray]:
    import skimage

    key = json.dumps({**params, "targets": TARGETS, "regions": REGIONS, "skimage": skimage.__version__, "v": ORACLE_VERSION}, sort_keys=True)
    path = cache_dir / f"color_oracle_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path) as z:
            return {r: z[r] for r in REGIONS}
    t0 = time.perf_counter()
    got = oracle(crops, TARGETS, REGIONS)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, **got)  # type: ignore[arg-type]
    print(f"oracle: {time.perf_counter() - t0:.0f} s (cached in {path})", file=sys.stderr)
    return got


# ----------------------------------------------------------------------------- colour version 1 (the old representation)

V1_LEVELS = 4
V1_CENTRES = color.srgb_to_lab(
    (np.stack(np.meshgrid(*[np.arange(V1_LEVELS)] * 3, indexing="ij"), axis=-1).reshape(-1, 3) + 0.5) / V1_LEVELS
)


def v1_hist(rgb_u8: np.ndarray) -> np.ndarray:
    """Colour version 1's 64-bin RGB histogram of a prepared image (stored as float16)."""
    q = (rgb_u8 // (256 // V1_LEVELS)).astype(np.int32)
    idx = (q[..., 0] * V1_LEVELS + q[..., 1]) * V1_LEVELS + q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=V1_LEVELS**3).astype(np.float32)
    return (hist / hist.sum()).astype(np.float16)


def v1_colour_scores(hists: np.ndarray, hexcol: str) -> np.ndarray:
    """Colour version 1's colour term: ΔE76 Gaussian (σ 25) over bins, bins above 1e-2 only."""
    lab = color.srgb_to_lab(color.parse_hex_color(hexcol))
    kern = np.exp(-((V1_CENTRES - lab) ** 2).sum(axis=-1) / (2.0 * 25.0**2)).astype(np.float32)
    kern[kern <= 1e-2] = 0.0
    return hists.astype(np.float32) @ kern


def v1_region_scores(regions: np.ndarray, region: int, hexcol: str) -> np.ndarray:
    """Colour version 1's region colour term: minus ΔE76 between the region's mean colour and the target."""
    lab = color.srgb_to_lab(color.parse_hex_color(hexcol))
    return -np.sqrt(((regions[:, region].astype(np.float32) - lab) ** 2).sum(axis=-1))


# ----------------------------------------------------------------------------- features and scoring


def features(crops: list[np.ndarray], *, via_thumbnail: bool = False) -> dict[str, np.ndarray]:
    """The library's colour columns for each crop (FeatureExtractor.prepare, as an import computes them)."""
    fs = FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=256, thumbnail_format="webp")
    fx = FeatureExtractor(FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=0), None)
    rows: list[dict[str, np.ndarray]] = []
    for crop in crops:
        im = Image.fromarray(crop)
        if via_thumbnail:  # what `upgrade` sees when it has no original images
            data = encode_thumbnail(im, fs)
            assert data is not None
            with Image.open(io.BytesIO(data)) as f:
                im = f.convert("RGB")
        rows.append(fx.prepare(im).colour)
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def v2_scores(cols: dict[str, np.ndarray], region: str, targets: dict[str, str] = TARGETS) -> np.ndarray:
    """[crops, targets]: the colour term of colour version 2 (the library's palette.colour_share_scores)."""
    pal = palette.PaletteColumns.from_rows(cols["palette"], cols["palette_shares"])
    r = color.REGION_NAMES.index(region)
    return np.stack(
        [palette.colour_share_scores(pal, color.srgb_to_lab(color.parse_hex_color(h)), region=r) for h in targets.values()], axis=1
    )


def v1_scores(crops: list[np.ndarray], cols: dict[str, np.ndarray], region: str, targets: dict[str, str] = TARGETS) -> np.ndarray:
    """[crops, targets]: the colour (whole) or region colour term of colour version 1."""
    if region == "whole":
        hists = np.stack([v1_hist(color.prepare(c)) for c in crops])
        return np.stack([v1_colour_scores(hists, h) for h in targets.values()], axis=1)
    r = color.REGION_NAMES.index(region)
    return np.stack([v1_region_scores(cols["regions"], r, h) for h in targets.values()], axis=1)


def quality(scores: np.ndarray, truth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per target: (quality ratio, precision@k) of ranking by ``scores`` against the oracle ``truth``."""
    ratio = np.zeros(truth.shape[1])
    prec = np.zeros(truth.shape[1])
    for j in range(truth.shape[1]):
        ours = np.argsort(-scores[:, j], kind="stable")[:k]
        best = np.argsort(-truth[:, j], kind="stable")[:k]
        ratio[j] = truth[ours, j].mean() / max(truth[best, j].mean(), 1e-12)
        prec[j] = len(set(ours.tolist()) & set(best.tolist())) / k
    return ratio, prec


def mixes(v1_whole: np.ndarray, pal: palette.PaletteColumns, truth: np.ndarray, k: int) -> dict[str, dict[str, float]]:
    """Quality of 2 : 1 two-colour queries: v1 as its Searcher combined them (z-scores over the set, weights 2
    and 1), v2 as palette.colour_mix_scores; the oracle is the same intersection on the true fractions."""
    names = list(TARGETS)
    z = (v1_whole - v1_whole.mean(axis=0)) / np.maximum(v1_whole.std(axis=0), 1e-12)
    out = {}
    for a, b in MIXES:
        i, j = names.index(a), names.index(b)
        oracle_mix = np.minimum(truth[:, i], 2 / 3) + np.minimum(truth[:, j], 1 / 3)
        v2 = palette.colour_mix_scores(pal, [color.srgb_to_lab(color.parse_hex_color(TARGETS[n])) for n in (a, b)], [2.0, 1.0])
        r1, p1 = quality((2 * z[:, i] + z[:, j])[:, None], oracle_mix[:, None], k)
        r2, p2 = quality(v2[:, None], oracle_mix[:, None], k)
        out[f"{a}+{b}"] = {"v1": float(r1[0]), "v2": float(r2[0]), "v1_p": float(p1[0]), "v2_p": float(p2[0])}
    return out


# ----------------------------------------------------------------------------- scan speed


def scan_speed(cols: dict[str, np.ndarray], hists: np.ndarray, n: int, reps: int, seed: int = 0) -> dict[str, Any]:
    """p50/p95 ms of one colour term over ``n`` rows resampled from the crops' palettes (v2) and of v1's scan."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(cols["palette"]), n)
    pal = palette.PaletteColumns.from_rows(cols["palette"][pick], cols["palette_shares"][pick])
    hexes = list(TARGETS.values())
    top = color.REGION_NAMES.index("top")

    def timed(fn: Any) -> dict[str, float]:
        # Wall time, and the process's CPU time (the shared bench machine is often busy with others' work).
        wall, cpu = [], []
        for i in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(hexes[i % len(hexes)])
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
        return {"p50_ms": float(np.percentile(wall, 50)), "p95_ms": float(np.percentile(wall, 95)), "cpu_p50_ms": float(np.percentile(cpu, 50))}

    def lab(h: str) -> np.ndarray:
        return color.srgb_to_lab(color.parse_hex_color(h))

    for h in hexes:  # the lookup tables are cached per colour, as in a running Searcher
        palette.colour_kernel(lab(h))
    res: dict[str, Any] = {"rows": n, "v2_whole": timed(lambda h: palette.colour_share_scores(pal, lab(h)))}
    res["v2_ram_bytes_per_row"] = pal.nbytes / n  # whole-image queries only
    res["v2_region_top"] = timed(lambda h: palette.colour_share_scores(pal, lab(h), region=top))
    res["v2_ram_bytes_per_row_per_region"] = pal.nbytes / n - res["v2_ram_bytes_per_row"]
    t0, c0 = time.perf_counter(), time.process_time()
    palette._kernel_cached.cache_clear()
    for h in hexes:
        palette.colour_kernel(lab(h))
    res["v2_lookup_table_ms"] = (time.perf_counter() - t0) * 1000 / len(hexes)
    res["v2_lookup_table_cpu_ms"] = (time.process_time() - c0) * 1000 / len(hexes)
    # v1: the query-side layout of colour version 1 (float32 column-major histogram, active bins only).
    hist = np.ascontiguousarray(hists[pick].astype(np.float32).T)

    def v1(h: str) -> np.ndarray:
        l_ = lab(h)
        kern = np.exp(-((V1_CENTRES - l_) ** 2).sum(axis=-1) / (2.0 * 25.0**2)).astype(np.float32)
        out = np.zeros(n, np.float32)
        for b in np.nonzero(kern > 1e-2)[0]:
            out += kern[b] * hist[b]
        return out

    res["v1_whole"] = timed(v1)
    res["v1_ram_bytes_per_row"] = hist.nbytes / n
    return res


# ----------------------------------------------------------------------------- report


def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_speed(sp: dict[str, Any]) -> None:
    print(f"\n#### Colour scan over {sp['rows']:,} synthetic rows\n")

    def row(label: str, key: str, ram: str) -> list[str]:
        t = sp[key]
        return [label, f"{t['p50_ms']:.1f} / {t['p95_ms']:.1f}", f"{t['cpu_p50_ms']:.1f}", ram]

    print(table([
        row("v1 histogram, whole image", "v1_whole", f"{sp['v1_ram_bytes_per_row']:.0f}"),
        row("v2 palette, whole image", "v2_whole", f"{sp['v2_ram_bytes_per_row']:.0f}"),
        row("v2 palette, region 'top'", "v2_region_top", f"+{sp['v2_ram_bytes_per_row_per_region']:.0f} per region"),
    ], ["scan", "wall ms p50 / p95", "CPU ms p50", "RAM B/row"]))
    print(f"\nv2 lookup table per new colour: {sp['v2_lookup_table_ms']:.1f} ms wall, {sp['v2_lookup_table_cpu_ms']:.1f} ms CPU "
          "(cached per colour)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-photo", type=int, default=80, help="crops per photograph (7 photographs; default 80 → 560 crops)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-side", type=int, default=384)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="20 crops per photograph")
    ap.add_argument("--no-thumbnails", action="store_true", help="skip the 'v2 from WebP thumbnails' column")
    ap.add_argument("--speed", type=int, default=0, help="also time the colour scan over this many synthetic rows")
    ap.add_argument("--speed-only", action="store_true", help="only the scan timing (palettes of the --quick crops; no oracle)")
    ap.add_argument("--reps", type=int, default=63, help="timed scans per measurement (--speed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "color_quality.json"))
    args = ap.parse_args(argv)
    per_photo = 20 if args.quick or args.speed_only else args.per_photo
    k = args.top_k
    if args.speed_only:
        crops = make_crops(per_photo, args.seed, args.max_side)
        sp = scan_speed(features(crops), np.stack([v1_hist(color.prepare(c)) for c in crops]), args.speed or 1_000_000, args.reps)
        print_speed(sp)
        out = Path(args.out).with_name("color_scan_speed.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"speed": sp, "load_average": os.getloadavg()[0]}, indent=2))
        print(f"\nwrote {out}", file=sys.stderr)
        return 0

    t0 = time.perf_counter()
    crops = make_crops(per_photo, args.seed, args.max_side)
    params = {"per_photo": per_photo, "seed": args.seed, "max_side": args.max_side, "photos": PHOTOS}
    truth = cached_oracle(crops, params, ROOT / "bench" / "results" / "cache")
    t1, c1 = time.perf_counter(), time.process_time()
    cols = features(crops)
    t_feat = (time.perf_counter() - t1) / len(crops)
    cpu_feat = (time.process_time() - c1) / len(crops)
    thumb_cols = None if args.no_thumbnails else features(crops, via_thumbnail=True)
    print(f"{len(crops)} crops ({per_photo} per photograph, seed {args.seed}); data + oracle {t1 - t0:.0f} s; "
          f"colour features {t_feat * 1000:.1f} ms per crop ({cpu_feat * 1000:.1f} ms CPU)", file=sys.stderr)

    results: dict[str, Any] = {"params": {**params, "crops": len(crops), "top_k": k, "threshold": THRESHOLD}, "regions": {}}
    names = list(TARGETS)
    v1_whole = None
    for region in REGIONS:
        variants = {"v1": v1_scores(crops, cols, region), "v2": v2_scores(cols, region)}
        if region == "whole":
            v1_whole = variants["v1"]
        if thumb_cols is not None:
            variants["v2_thumb"] = v2_scores(thumb_cols, region)
        per: dict[str, Any] = {}
        for vname, sc in variants.items():
            ratio, prec = quality(sc, truth[region], k)
            per[vname] = {
                "quality": dict(zip(names, ratio.round(4).tolist())),
                f"precision_at_{k}": dict(zip(names, prec.round(3).tolist())),
                "quality_mean": float(ratio.mean()),
                "quality_min": float(ratio.min()),
                f"precision_at_{k}_mean": float(prec.mean()),
            }
        per["oracle_topk_mean"] = dict(zip(names, [float(np.sort(truth[region][:, j])[::-1][:k].mean()) for j in range(len(names))]))
        results["regions"][region] = per

    w = results["regions"]["whole"]
    vs = [v for v in ("v1", "v2", "v2_thumb") if v in w]
    head = ["colour", "hex", "oracle top-k"] + [f"{v} quality" for v in vs] + [f"{v} P@{k}" for v in vs]
    rows = []
    for n in names:
        rows.append([n, TARGETS[n], f"{w['oracle_topk_mean'][n]:.2f}"] + [f"{w[v]['quality'][n]:.3f}" for v in vs]
                    + [f"{w[v][f'precision_at_{k}'][n]:.2f}" for v in vs])
    rows.append(["**mean**", "", ""] + [f"**{w[v]['quality_mean']:.3f}**" for v in vs] + [f"**{w[v][f'precision_at_{k}_mean']:.2f}**" for v in vs])
    rows.append(["**min**", "", ""] + [f"{w[v]['quality_min']:.3f}" for v in vs] + [""] * len(vs))
    print(f"\n#### Whole image: {len(crops)} crops, top-{k}\n")
    print(table(rows, head))

    assert v1_whole is not None
    v2_pal = palette.PaletteColumns.from_rows(cols["palette"], cols["palette_shares"])
    results["mixes"] = mixes(v1_whole, v2_pal, truth["whole"], k)

    regs = [r for r in REGIONS if r != "whole"]
    head = ["colour"] + [f"{r} v1 / v2" for r in regs]
    rows = [[n] + [f"{results['regions'][r]['v1']['quality'][n]:.3f} / {results['regions'][r]['v2']['quality'][n]:.3f}" for r in regs] for n in names]
    rows.append(["**mean quality**"] + [f"**{results['regions'][r]['v1']['quality_mean']:.3f} / {results['regions'][r]['v2']['quality_mean']:.3f}**" for r in regs])
    rows.append(["**min quality**"] + [f"{results['regions'][r]['v1']['quality_min']:.3f} / {results['regions'][r]['v2']['quality_min']:.3f}" for r in regs])
    rows.append([f"**mean P@{k}**"] + [f"{results['regions'][r]['v1'][f'precision_at_{k}_mean']:.2f} / {results['regions'][r]['v2'][f'precision_at_{k}_mean']:.2f}" for r in regs])
    print(f"\n#### Region colour queries (quality ratio v1 / v2), top-{k}\n")
    print(table(rows, head))

    mx = results["mixes"]
    rows = [[f"{a} 2 : {b} 1", f"{mx[f'{a}+{b}']['v1']:.3f}", f"{mx[f'{a}+{b}']['v2']:.3f}", f"{mx[f'{a}+{b}']['v1_p']:.2f}",
             f"{mx[f'{a}+{b}']['v2_p']:.2f}"] for a, b in MIXES]
    rows.append(["**mean**", f"**{np.mean([mx[f'{a}+{b}']['v1'] for a, b in MIXES]):.3f}**",
                 f"**{np.mean([mx[f'{a}+{b}']['v2'] for a, b in MIXES]):.3f}**", "", ""])
    print(f"\n#### Colour mixes (v1: weighted sum of z-scored colour terms; v2: one mix term), top-{k}\n")
    print(table(rows, ["mix", "v1 quality", "v2 quality", f"v1 P@{k}", f"v2 P@{k}"]))

    checks = {
        "whole mean >= 0.95": w["v2"]["quality_mean"] >= 0.95,
        "whole every colour >= 0.85": w["v2"]["quality_min"] >= 0.85,
        "regions mean >= 0.90": all(results["regions"][r]["v2"]["quality_mean"] >= 0.90 for r in regs),
        "regions every colour >= 0.85": all(results["regions"][r]["v2"]["quality_min"] >= 0.85 for r in regs),
    }
    results["checks"] = checks
    results["feature_ms_per_crop"] = {"wall": t_feat * 1000, "cpu": cpu_feat * 1000}
    print("\n" + "  ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()))

    if args.speed:
        sp = scan_speed(cols, np.stack([v1_hist(color.prepare(c)) for c in crops]), args.speed, args.reps)
        results["speed"] = sp
        print_speed(sp)

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_env import environment

    results["environment"] = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
