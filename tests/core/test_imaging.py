"""User images decode as seen: 16-bit and float by their real range, EXIF orientation applied, every mode to RGB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import solid
from PIL import Image

from noisequery_core import Library, import_folder
from noisequery_core.cli import main
from noisequery_core.imaging import ImageDecodeError, load_image, to_rgb8
from noisequery_core.search import color

ORIENTATION = 0x0112


def grey16(value: float, path: Path) -> Path:
    Image.fromarray(np.full((32, 32), round(value * 65535), np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I"), "the test needs a 16-bit file"
    return path


def float_tiff(value: float, path: Path) -> Path:
    Image.fromarray(np.full((32, 32), value, np.float32)).save(path)
    assert Image.open(path).mode == "F"
    return path


def rotated_jpeg(path: Path) -> Path:
    """Stored landscape 64 x 32, left half white, right half black, with EXIF orientation 6 ("turn 90 degrees
    clockwise to view"): a viewer shows it portrait 32 x 64, white on top."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())
    return path


def stat(lib: Library, seed: int, name: str) -> float:
    return float(lib.column("stats")[int(lib.rows_of([seed])[0])][color.STAT_INDEX[name]])


def test_sixteen_bit_and_float_images_import_with_their_real_brightness(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    grey16(0.5, src / "1.png")
    float_tiff(0.5, src / "2.tif")
    grey16(0.25, src / "3.tiff")
    solid((128, 128, 128)).save(src / "4.png")  # the 8-bit reference
    rep = import_folder(src, tmp_path / "lib", embedder=None, thumbnail_size=0)
    assert rep.added == 4, rep.summary()
    lib = Library.open(tmp_path / "lib")
    assert stat(lib, 1, "brightness") == pytest.approx(0.5, abs=0.01)
    assert stat(lib, 2, "brightness") == pytest.approx(0.5, abs=0.01)
    assert stat(lib, 3, "brightness") == pytest.approx(0.25, abs=0.01)
    assert stat(lib, 1, "brightness") == pytest.approx(stat(lib, 4, "brightness"), abs=1e-3)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = rotated_jpeg(tmp_path / "5.jpg")
    with Image.open(path) as raw:  # the premise: the stored layout is not what is seen
        assert raw.size == (64, 32) and np.asarray(raw.convert("L"))[:, :16].mean() > 200
    im = load_image(path)
    arr = np.asarray(im)
    assert im.mode == "RGB" and im.size == (32, 64)
    assert arr[:28].mean() > 240 and arr[36:].mean() < 15  # white on top, as a viewer shows it

    rep = import_folder(tmp_path, tmp_path / "lib", embedder=None, thumbnail_size=0)
    assert rep.added == 1
    lib = Library.open(tmp_path / "lib")
    regions = lib.column("regions")[0].astype(np.float32)  # mean CIELAB per named region, L 0..100
    lightness = {name: float(regions[i, 0]) for i, name in enumerate(color.REGION_NAMES)}
    assert lightness["top"] > 90 and lightness["bottom"] < 10, lightness
    assert abs(lightness["left"] - lightness["right"]) < 5, lightness


def palette_image() -> Image.Image:
    im = Image.new("P", (4, 4), 3)
    im.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    return im


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: palette_image(), (10, 200, 30)),
    (lambda: Image.new("LA", (4, 4), (200, 0)), (200, 200, 200)),  # alpha dropped, stored grey kept
    (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((4, 4), 65535, np.int32)), (255, 255, 255)),  # mode I: 16-bit range
    (lambda: Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), (100, 100, 100)),  # I;16
    (lambda: Image.fromarray(np.full((4, 4), 1.5, np.float32)), (255, 255, 255)),  # F above 1: clipped
    (lambda: Image.fromarray(np.full((4, 4), -0.5, np.float32)), (0, 0, 0)),
])
def test_every_mode_becomes_8_bit_rgb(make, expected) -> None:
    im = make()
    out = to_rgb8(im)
    assert out.mode == "RGB" and out.size == im.size
    assert tuple(int(v) for v in np.asarray(out)[0, 0]) == expected


def test_float_image_with_nan_is_refused_and_skipped_on_import(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    a = np.full((8, 8), 0.5, np.float32)
    a[2, 3] = np.nan
    Image.fromarray(a).save(src / "7.tif")
    solid((1, 2, 3)).save(src / "8.png")
    with pytest.raises(ImageDecodeError, match="NaN or infinite pixels"):
        load_image(src / "7.tif")
    rep = import_folder(src, tmp_path / "lib", embedder=None, thumbnail_size=0)
    assert rep.added == 1 and "NaN or infinite" in dict(rep.skipped)["7.tif"], rep.skipped


def test_like_image_decodes_sixteen_bit_as_seen(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    for seed, grey in ((1, 128), (2, 255), (3, 0)):
        solid((grey, grey, grey)).save(src / f"{seed}.png")
    lib = str(tmp_path / "lib")
    out: list[str] = []
    assert main(["import", str(src), "--library", lib, "--clip-model", "none", "-q"], out=out.append) == 0
    example = grey16(0.5, tmp_path / "example.png")
    out.clear()
    code = main(["search", "--library", lib, "--like-image", str(example), "--top-k", "1", "--json"], out=out.append)
    assert code == 0 and json.loads("\n".join(out))[0]["seed"] == 1  # mid-grey, not white
