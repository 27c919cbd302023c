"""Palettes and the colour-share score on images of known colours; CIEDE2000 against published values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisequery_core import FeatureExtractor, Library, Query, Searcher
from noisequery_core.library.manifest import FeatureSet, GenerationKey
from noisequery_core.search import color, palette
from noisequery_core.search.colorspace import ciede2000, lab_to_srgb, srgb_to_lab


def stripes(parts: list[tuple[tuple[int, int, int], float]], size: int = 128) -> Image.Image:
    """Horizontal bands of the given colours, each taking its fraction of the height (top first)."""
    a = np.zeros((size, size, 3), np.uint8)
    y = 0
    for rgb, frac in parts:
        h = round(frac * size)
        a[y : y + h] = rgb
        y += h
    a[y:] = parts[-1][0]
    return Image.fromarray(a)


def columns_of(images: list[Image.Image]) -> palette.PaletteColumns:
    f = color.analyse(images)  # type: ignore[arg-type]
    return palette.PaletteColumns.from_rows(f.palette, f.palette_shares)


def lab(hexcol: str) -> np.ndarray:
    return color.srgb_to_lab(color.parse_hex_color(hexcol))


# Sharma, Wu & Dalal (2005), test data pairs 1, 7, 13 and 25 with their published CIEDE2000.
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.4900, -0.0010), (50.0, -2.4900, 0.0011), 7.2195),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
]


@pytest.mark.parametrize(("a", "b", "want"), SHARMA)
def test_ciede2000_matches_published_values(a: tuple[float, ...], b: tuple[float, ...], want: float) -> None:
    assert float(ciede2000(np.array(a), np.array(b))) == pytest.approx(want, abs=1e-4)
    assert float(ciede2000(np.array(b), np.array(a))) == pytest.approx(want, abs=1e-4)


def test_lab_round_trip() -> None:
    rgb = np.random.default_rng(0).uniform(0, 1, (1000, 3)).astype(np.float32)
    assert np.abs(lab_to_srgb(srgb_to_lab(rgb)) - rgb).max() < 1e-4


def test_palette_shares_follow_the_picture_and_are_deterministic() -> None:
    im = stripes([((220, 20, 20), 0.5), ((20, 40, 220), 0.3), ((20, 200, 40), 0.2)])
    a = color.analyse([im])
    b = color.analyse([im.copy()])
    assert np.array_equal(a.palette, b.palette) and np.array_equal(a.palette_shares, b.palette_shares)
    whole = a.palette_shares[0, 0].astype(int)
    assert whole[:3].tolist() == pytest.approx([128, 77, 51], abs=2) and whole[3:].sum() == 0
    cols = palette.PaletteColumns.from_rows(a.palette, a.palette_shares)
    for hexcol, share in (("#DC1414", 0.5), ("#1428DC", 0.3), ("#14C828", 0.2), ("#FFFF00", 0.0)):
        assert palette.colour_share_scores(cols, lab(hexcol))[0] == pytest.approx(share, abs=0.02)
    top = color.REGION_NAMES.index("top")
    assert palette.colour_share_scores(cols, lab("#DC1414"), region=top)[0] == pytest.approx(1.0, abs=0.02)


def test_share_counts_colours_within_the_threshold_only() -> None:
    # Orange, a nearby orange (CIEDE2000 ≈ 8 from #FF8800) and a far one (a dull brown ≈ 33 away).
    near, far = (240, 150, 40), (120, 70, 40)
    assert float(ciede2000(lab("#F09628"), lab("#FF8800"))) < 12 and float(ciede2000(lab("#784628"), lab("#FF8800"))) > 28
    cols = columns_of([stripes([(near, 0.6), (far, 0.4)]), stripes([(far, 0.6), (near, 0.4)])])
    got = palette.colour_share_scores(cols, lab("#FF8800"))
    assert got.tolist() == pytest.approx([0.6, 0.4], abs=0.03)


def test_rows_subset_equals_the_full_scan() -> None:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)) for _ in range(7)]
    cols = columns_of(images)
    full = palette.colour_share_scores(cols, lab("#808080"), region=3)
    rows = np.array([5, 0, 3])
    assert np.array_equal(palette.colour_share_scores(cols, lab("#808080"), region=3, rows=rows), full[rows])


def test_damaged_rows() -> None:
    f = color.analyse([stripes([((255, 0, 0), 0.5), ((0, 0, 255), 0.5)])] * 3)
    pal, shares = f.palette.copy(), f.palette_shares.copy()
    assert not palette.damaged_rows(pal, shares).any()
    pal[1, 0, 0] = 65535
    shares[2, 4, 0] = 0
    assert palette.damaged_rows(pal, shares).tolist() == [False, True, True]


def test_several_colours_are_a_mix(tmp_path: Path) -> None:
    orange, blue = (255, 136, 0), (30, 80, 200)
    images = {
        1: stripes([(orange, 1.0)]),
        2: stripes([(orange, 0.7), (blue, 0.3)]),
        3: stripes([(orange, 0.3), (blue, 0.7)]),
        4: stripes([(blue, 1.0)]),
        5: stripes([((128, 128, 128), 1.0)]),
    }
    fs = FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=0)
    lib = Library.create(tmp_path / "lib", GenerationKey(model="m"), fs)
    cols, thumbs = FeatureExtractor(fs, None)(list(images.values()))
    with lib.writer(durable=False) as w:
        w.append(list(images), cols, thumbs)
    s = Searcher(lib)
    mostly_orange = s.search(Query(colors=(("#FF8800", 2.0), ("#1E50C8", 1.0)), top_k=5))
    assert [h.seed for h in mostly_orange][:3] == [2, 1, 3]
    assert list(mostly_orange[0].terms) == ["colors #FF8800 67% + #1E50C8 33%"]
    assert [h.seed for h in s.search(Query(colors=(("#FF8800", 1.0), ("#1E50C8", 2.0)), top_k=2))] == [3, 4]
    # One colour is its share; a negative weight avoids a colour (separate terms, as before).
    assert [h.seed for h in s.search(Query(colors=(("#FF8800", 1.0),), top_k=2))] == [1, 2]
    avoid = s.search(Query(colors=(("#FF8800", 1.0), ("#1E50C8", -1.0)), top_k=1))
    assert avoid[0].seed == 1 and set(avoid[0].terms) == {"color #FF8800", "color #1E50C8"}
