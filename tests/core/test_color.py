"""Low-level features on images of known colour and layout."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import halves, solid
from PIL import Image

from noisequery_core.errors import QueryError
from noisequery_core.search import color, palette


def stats_of(im: Image.Image) -> dict[str, float]:
    f = color.analyse([im])
    return dict(zip(color.STAT_NAMES, f.stats[0].tolist()))


def test_solid_colours() -> None:
    white, black, red, grey = (stats_of(solid(c)) for c in [(255, 255, 255), (0, 0, 0), (255, 0, 0), (128, 128, 128)])
    assert white["brightness"] == pytest.approx(1.0, abs=1e-3)
    assert black["brightness"] == pytest.approx(0.0, abs=1e-3)
    assert grey["saturation"] == pytest.approx(0.0, abs=1e-6)
    assert red["saturation"] == pytest.approx(1.0, abs=1e-6)
    assert (red["mean_r"], red["mean_g"], red["mean_b"]) == pytest.approx((1.0, 0.0, 0.0), abs=1e-3)
    for s in (white, black, grey):
        assert s["contrast"] == pytest.approx(0.0, abs=1e-6)
        assert s["colorfulness"] == pytest.approx(0.0, abs=1e-6)
    assert red["colorfulness"] > 0.5  # Hasler–Süsstrunk of pure red is about 0.3·|(255, 127.5)| / 100


def test_ranges_and_sharpness() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    flat = solid((90, 120, 150), 128)
    s_noisy, s_flat = stats_of(noisy), stats_of(flat)
    assert s_noisy["sharpness"] > s_flat["sharpness"] + 0.3
    for st in color.STATS:
        assert st.lo <= s_noisy[st.name] <= st.hi
    half = stats_of(halves((0, 0, 0), (255, 255, 255)))
    assert half["contrast"] == pytest.approx(1.0, abs=1e-3)


def test_layout_and_regions_follow_the_picture() -> None:
    f = color.analyse([halves((0, 0, 255), (255, 255, 0))])
    lab = color.layout_to_lab(f.layout[0])
    top, bottom = lab[: color.GRID // 2].reshape(-1, 3), lab[color.GRID // 2 :].reshape(-1, 3)
    assert (top[:, 2] < -80).all(), "blue has strongly negative b*"
    assert (bottom[:, 2] > 60).all(), "yellow has strongly positive b*"
    assert (bottom[:, 0] > top[:, 0] + 50).all(), "yellow is far lighter than blue"
    reg = dict(zip(color.REGION_NAMES, f.regions[0].astype(np.float32)))
    assert reg["top"][2] < -80 and reg["bottom"][2] > 60
    assert reg["left"][0] == pytest.approx(reg["right"][0], abs=1)


def test_palette_shares_sum_to_one_and_find_the_colour() -> None:
    f = color.analyse([solid((250, 130, 10)), halves((0, 0, 255), (255, 255, 0))])
    assert f.palette_shares.shape == (2, len(color.REGION_NAMES), palette.PALETTE_SIZE)
    assert (np.abs(f.palette_shares.astype(int).sum(axis=-1) - 255) <= 4).all()
    cols = palette.PaletteColumns.from_rows(f.palette, f.palette_shares)

    def share(hexcol: str, region: str = "whole") -> np.ndarray:
        lab = color.srgb_to_lab(color.parse_hex_color(hexcol))
        return palette.colour_share_scores(cols, lab, region=color.REGION_NAMES.index(region))

    assert share("#FF8800")[0] > 0.95 and share("#0000FF")[0] < 0.01
    assert share("#0000FF")[1] == pytest.approx(0.5, abs=0.02)
    assert share("#0000FF", "top")[1] > 0.95 and share("#0000FF", "bottom")[1] < 0.01
    assert share("#FFFF00", "bottom")[1] > 0.95 and share("#FFFF00", "top_left")[1] < 0.01


def test_any_size_and_aspect() -> None:
    wide = Image.new("RGB", (300, 40), (10, 200, 30))
    f = color.analyse([wide, np.asarray(wide), np.asarray(wide, np.float32) / 255])
    assert np.allclose(f.stats[0], f.stats[1]) and np.allclose(f.stats[0], f.stats[2], atol=1e-3)


@pytest.mark.parametrize("bad", ["red", "#12345", "#GGGGGG", "", "#1234567"])
def test_bad_hex(bad: str) -> None:
    with pytest.raises(QueryError, match="hex colour"):
        color.parse_hex_color(bad)


def test_short_hex() -> None:
    assert color.parse_hex_color("#f80").tolist() == pytest.approx([1.0, 0x88 / 255, 0.0])
