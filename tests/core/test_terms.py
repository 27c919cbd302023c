"""Query terms one at a time (search/terms.py): each term's raw score per row, on hand-made rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_lib import feature_set

from noisequery_core import Query, QueryError, RegionTarget, StatTarget
from noisequery_core.library.manifest import GenerationKey
from noisequery_core.library.storage import Library
from noisequery_core.search import color, palette
from noisequery_core.search.index import ClipSearcher
from noisequery_core.search.terms import ScanColumns, clip_terms, color_term, color_terms, layout_term, region_term, stat_term

BRIGHT = color.STAT_INDEX["brightness"]


@pytest.fixture
def lib(tmp_path: Path) -> Library:
    """Four rows: brightness 0.1/0.4/0.6/0.9; one palette colour per row (row 2 orange, the others blue) except
    in row 1's top half, which is black; region 'top' mean L = 10/40/60/90."""
    n, dim = 4, 4
    stats = np.zeros((n, len(color.STATS)), np.float32)
    stats[:, BRIGHT] = [0.1, 0.4, 0.6, 0.9]
    pal = np.zeros((n, palette.PALETTE_SIZE, 2), np.uint16)
    pal[:, 0, 0] = palette.code_of_lab(color.srgb_to_lab(color.parse_hex_color("#0000FF")))
    pal[2, 0, 0] = palette.code_of_lab(color.srgb_to_lab(color.parse_hex_color("#FF8800")))  # row 2 is all orange
    pal[:, 1, 0] = palette.code_of_lab(color.srgb_to_lab(color.parse_hex_color("#000000")))
    shares = np.zeros((n, len(color.REGION_NAMES), palette.PALETTE_SIZE), np.uint8)
    shares[:, :, 0] = 255
    top = color.REGION_NAMES.index("top")
    shares[1, top] = 0
    shares[1, top, 1] = 255  # row 1's top half is black
    shares[1, 0, :2] = [128, 127]  # so half of row 1 is black
    regions = np.zeros((n, len(color.REGION_NAMES), 3), np.float16)
    regions[:, color.REGION_NAMES.index("top"), 0] = [10, 40, 60, 90]
    layout = np.zeros((n, color.GRID, color.GRID, 3), np.uint8)
    layout[3] = 255  # row 3 is white everywhere
    clip = np.eye(n, dim, dtype=np.float16)
    lib = Library.create(tmp_path / "lib", GenerationKey(), feature_set(dim))
    with lib.writer(durable=False) as w:
        w.append(np.arange(n, dtype=np.uint64), {"stats": stats, "palette": pal, "palette_shares": shares, "layout": layout, "regions": regions,
                                                 "clip": clip})
    return Library.open(lib.path)


def test_stat_target_and_range(lib: Library) -> None:
    cols = ScanColumns(lib)
    t = stat_term(cols, StatTarget("brightness", target=0.5))
    np.testing.assert_allclose(t.score(None), [-0.4, -0.1, -0.1, -0.4], atol=1e-6)
    np.testing.assert_allclose(t.score(np.array([3, 0])), [-0.4, -0.4], atol=1e-6)
    r = stat_term(cols, StatTarget("brightness", lo=0.3, hi=0.7, weight=2.0))
    np.testing.assert_allclose(r.score(None), [-0.2, 0.0, 0.0, -0.2], atol=1e-6)
    assert (r.name, r.weight) == ("brightness in [0.3,0.7]", 2.0)
    with pytest.raises(QueryError, match="range low 0.8 is above high 0.2"):
        stat_term(cols, StatTarget("brightness", lo=0.8, hi=0.2))


def test_color_term_prefers_the_row_of_that_colour(lib: Library) -> None:
    t = color_term(ScanColumns(lib), "#FF8800", 1.0)
    s = t.score(None)
    assert int(np.argmax(s)) == 2 and s[2] > 0.5 and np.all(s[[0, 1, 3]] < 0.1)
    np.testing.assert_array_equal(t.score(np.array([2, 0])), s[[2, 0]])


def test_several_colours_are_one_mix_term(lib: Library) -> None:
    cols = ScanColumns(lib)
    (mix,) = color_terms(cols, [("#FF8800", 2.0), ("#0000FF", 1.0)])
    assert (mix.name, mix.weight) == ("colors #FF8800 67% + #0000FF 33%", 3.0)
    np.testing.assert_allclose(mix.score(None), [1 / 3, 1 / 3, 2 / 3, 1 / 3], atol=0.01)  # Σ min(share, proportion)
    apart = color_terms(cols, [("#FF8800", 1.0), ("#0000FF", -1.0)])  # a negative weight: separate terms
    assert [(t.name, t.weight) for t in apart] == [("color #FF8800", 1.0), ("color #0000FF", -1.0)]


def test_region_lightness_and_colour(lib: Library) -> None:
    cols = ScanColumns(lib)
    light = region_term(cols, RegionTarget("top", lightness=0.5))
    np.testing.assert_allclose(light.score(None), [-40, -10, -10, -40], atol=0.1)
    dark = region_term(cols, RegionTarget("top", color="#000000"))  # the share of the top half that is black
    np.testing.assert_allclose(dark.score(None), [0, 1, 0, 0], atol=0.01)
    np.testing.assert_allclose(region_term(cols, RegionTarget("whole", color="#000000")).score(None), [0, 0.5, 0, 0], atol=0.01)
    with pytest.raises(QueryError, match="Unknown region"):
        region_term(cols, RegionTarget("middle", lightness=0.5))


def test_layout_term(lib: Library) -> None:
    white = np.full((color.GRID, color.GRID, 3), 255, np.uint8)
    s = layout_term(lib, white, 1.0).score(None)
    assert s[3] == pytest.approx(0.0, abs=1e-3) and np.all(s[:3] < -50)
    with pytest.raises(QueryError, match="grid"):
        layout_term(lib, np.zeros((3, 3, 3), np.uint8), 1.0)


def test_clip_terms_are_cosines_with_signed_weights(lib: Library) -> None:
    vectors = {"a": np.array([1, 0, 0, 0], np.float32), "b": np.array([0, 1, 0, 0], np.float32)}
    q = Query(text="a", negative_text="b", negative_weight=0.5, image_embedding=np.array([0, 0, 3, 0], np.float32))
    terms = clip_terms(q, vectors.__getitem__, 4, ClipSearcher(lib))
    assert [(t.name, t.weight) for t in terms] == [("text", 1.0), ("negative_text", -0.5), ("image", 1.0)]
    for t, row in zip(terms, (0, 1, 2)):
        expected = np.zeros(4)
        expected[row] = 1.0  # unit rows: the cosine is 1 on the matching row only (the example is normalised)
        np.testing.assert_allclose(t.score(None), expected, atol=1e-3)
    with pytest.raises(QueryError, match="3 dimensions"):
        clip_terms(Query(image_embedding=np.ones(3, np.float32)), vectors.__getitem__, 4, ClipSearcher(lib))
