"""The library browser's service (search/service.py) without a host: listing, paging, caches, refusals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOR_WORDS, FakeEmbedder
from helpers_lib import make_library, rows
from PIL import Image

from noisequery_core.errors import LibraryError, QueryError
from noisequery_core.library.manifest import ClipIdentity, FeatureSet, GenerationKey
from noisequery_core.library.storage import Library
from noisequery_core.search import color
from noisequery_core.search.service import LibraryService, parse_query_request


class CountingEmbedder(FakeEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def encode_text(self, texts: list[str]) -> np.ndarray:
        self.calls += texts
        return super().encode_text(texts)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "noise_libraries"
    clip = np.stack([FakeEmbedder.vector(COLOR_WORDS[i % len(COLOR_WORDS)]) for i in range(40)])
    make_library(root / "words", list(range(100, 140)), clip=clip)
    make_library(root / "team" / "colour_only", [1, 2, 3], dim=None)
    Library.create(root / "empty", GenerationKey(model="m"), FeatureSet(clip=None, color_version=color.COLOR_VERSION))
    old = Library.create(root / "old", GenerationKey(model="m"), FeatureSet(clip=ClipIdentity("fake", "v1", 16), color_version=1))
    with old.writer(durable=False) as w:
        cols = {name: np.zeros((2, *shape), dtype) for name, dtype, shape in color.columns_of_version(1)}
        cols["clip"] = rows(2)["clip"]
        w.append(np.array([5, 6], np.uint64), cols)
    return root


def test_libraries_say_what_each_can_answer(roots: Path) -> None:
    got = {d["name"]: d for d in LibraryService(lambda: [roots]).libraries()["libraries"]}
    assert set(got) == {"words", "team/colour_only", "empty", "old"}
    assert (got["words"]["status"], got["words"]["text"], got["words"]["color"]) == ("ok", True, True)
    assert got["team/colour_only"]["text"] is False and "Colour-only" in got["team/colour_only"]["notes"][0]
    assert got["empty"]["status"] == "empty"
    assert got["old"]["status"] == "needs_upgrade" and "upgrade --library" in " ".join(got["old"]["notes"])
    assert got["old"]["text"] is True and got["old"]["color"] is False


def test_text_is_encoded_once_and_pages_come_from_the_cache(roots: Path) -> None:
    enc = CountingEmbedder()
    svc = LibraryService(lambda: [roots], lambda ident: enc)
    first = svc.query({"library": "words", "text": "red", "limit": 5})
    assert [(int(h["seed"]) - 100) % 8 for h in first["hits"]] == [0] * 5  # rows of "red" (word 0) first
    assert first["has_more"] and not first["cached"]
    second = svc.query({"library": "words", "text": "red", "limit": 5, "offset": 5})
    assert [h["rank"] for h in second["hits"]] == list(range(5, 10))
    again = svc.query({"library": "words", "text": "red", "limit": 5})  # e.g. the same text typed again
    assert again["cached"] and again["hits"] == first["hits"]
    seeds = [h["seed"] for h in first["hits"] + second["hits"]]
    assert len(set(seeds)) == 10
    svc.query({"library": "words", "text": "red", "text_weight": 2.0, "limit": 5})  # new ranking, same text
    assert enc.calls == ["red"]


def test_refusals_name_the_field(roots: Path) -> None:
    svc = LibraryService(lambda: [roots], lambda ident: FakeEmbedder())
    for body, word in [({"library": "../words", "text": "x"}, "'..'"),
                       ({"library": "team/colour_only", "text": "red"}, "colour-only"),
                       ({"library": "old", "colors": [{"color": "#ff0000"}]}, "upgrade"),
                       ({"library": "empty", "colors": [{"color": "#ff0000"}]}, "empty"),
                       ({"library": "words", "text": "x", "text_weight": float("nan")}, "text_weight"),
                       ({"library": "words", "text": "x", "limit": 97}, "limit")]:
        with pytest.raises((QueryError, LibraryError), match=word):
            svc.query(body)
    with pytest.raises(QueryError, match="seed"):
        svc.thumbnail("words", "../1")
    with pytest.raises(QueryError, match="unknown"):
        parse_query_request({"library": "words", "text": "x", "file": "/etc/passwd"})


def test_short_text_encoding_equals_open_clips(tiny_clip) -> None:  # type: ignore[no-untyped-def]
    from noisequery_core.search.clip import ShortTextEncoder

    assert ShortTextEncoder.applies(tiny_clip) and not ShortTextEncoder.applies(FakeEmbedder())
    short = ShortTextEncoder(tiny_clip)
    texts = ["a red square", "a much longer text about a blue circle on a green field at night"]
    got = short.encode_text(texts)
    assert short._ok  # the first-use check against the full encoder passed
    assert np.allclose(got, tiny_clip.encode_text(texts), atol=1e-5)
    assert np.allclose(short.encode_text(texts[:1]), tiny_clip.encode_text(texts[:1]), atol=1e-5)


# ---------------------------------------------------------------- "like this image": uploaded examples


class ImageEmbedder(FakeEmbedder):
    """A fake CLIP with an image path: an image's embedding is its mean colour per quarter (deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((2, 2), Image.Resampling.BOX), np.float32).reshape(-1)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.images += len(pixels)
        v = np.zeros((len(pixels), self.dim), np.float32)
        v[:, :12] = pixels / 255.0
        v[:, 12] = 1.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _pictures() -> list[Image.Image]:
    """Five pictures that differ in colour and where the colour is (left/right halves)."""
    pairs = [("#d02010", "#1040c0"), ("#10a040", "#f0e0d0"), ("#202020", "#f0c020"), ("#f0c020", "#202020"),
             ("#8040c0", "#40c0c0")]
    out = []
    for left, right in pairs:
        im = Image.new("RGB", (96, 64), left)
        im.paste(Image.new("RGB", (48, 64), right), (48, 0))
        out.append(im)
    return out


def _image_library(path: Path, with_clip: bool) -> list[bytes]:
    """A library whose entries are _pictures() (seeds 10..14), features computed as a build computes them."""
    pics = _pictures()
    feats = color.analyse(pics)
    cols = {name: getattr(feats, name) for name, _, _ in color.COLUMNS_BY_VERSION[color.COLOR_VERSION]}
    clip = ClipIdentity("fake", "v1", FakeEmbedder.dim) if with_clip else None
    if with_clip:
        emb = ImageEmbedder()
        cols["clip"] = emb.encode_images(np.stack([emb.preprocess(p) for p in pics])).astype(np.float16)
    lib = Library.create(path, GenerationKey(model="m"), FeatureSet(clip=clip, color_version=color.COLOR_VERSION))
    with lib.writer(durable=False) as w:
        w.append(np.arange(10, 15, dtype=np.uint64), cols)
    uploads = []
    for p in pics:
        buf = io.BytesIO()
        p.save(buf, "PNG")
        uploads.append(buf.getvalue())
    return uploads


@pytest.mark.parametrize("with_clip", [True, False], ids=["clip", "colour-only"])
def test_an_uploaded_image_finds_its_own_entry(tmp_path: Path, with_clip: bool) -> None:
    root = tmp_path / "noise_libraries"
    uploads = _image_library(root / "pics", with_clip)
    enc = ImageEmbedder()
    svc = LibraryService(lambda: [root], lambda ident: enc)
    for i, data in enumerate(uploads):
        ex = svc.add_example(data)
        assert (ex["width"], ex["height"], ex["format"]) == (96, 64, "PNG")
        got = svc.query({"library": "pics", "like_image": {"id": ex["id"]}, "limit": 5})
        assert got["hits"][0]["seed"] == str(10 + i), (i, got["hits"])
        assert got["example_by"] == (["clip", "colour", "palette"] if with_clip else ["colour", "palette"])
        assert ("image" in got["hits"][0]["terms"]) is with_clip and "layout" in got["hits"][0]["terms"]
        assert "palette" in got["hits"][0]["terms"]
    # combined with another term, and embedded once per example and model (not again per page or keystroke)
    ex = svc.add_example(uploads[2])
    svc.query({"library": "pics", "like_image": {"id": ex["id"], "weight": 2}, "colors": [{"color": "#f0c020"}]})
    svc.query({"library": "pics", "like_image": {"id": ex["id"]}, "limit": 2, "offset": 2})
    assert enc.images == (5 if with_clip else 0)


RED, BLUE = "#d02010", "#1040c0"


def _halves(left: str, right: str) -> Image.Image:
    im = Image.new("RGB", (96, 64), left)
    im.paste(Image.new("RGB", (48, 64), right), (48, 0))
    return im


def _colour_library(root: Path, pics: list[Image.Image]) -> LibraryService:
    """A colour-only library "pics" of ``pics`` (seeds 10, 11, …), features as a build computes them."""
    feats = color.analyse(pics)
    lib = Library.create(root / "pics", GenerationKey(model="m"), FeatureSet(clip=None, color_version=color.COLOR_VERSION))
    with lib.writer(durable=False) as w:
        w.append(np.arange(10, 10 + len(pics), dtype=np.uint64),
                 {name: getattr(feats, name) for name, _, _ in color.COLUMNS_BY_VERSION[color.COLOR_VERSION]})
    return LibraryService(lambda: [root])


# the red|blue picture, a uniform picture in the Lab midpoint of red and blue, two pictures in other colours
MIRROR_CASE = [_halves(RED, BLUE), Image.new("RGB", (96, 64), "#9f316b"), _halves("#10a040", "#f0e0d0"),
               _halves("#202020", "#f0c020")]


def test_an_uploaded_image_matches_its_colours_wherever_they_are(tmp_path: Path) -> None:
    """The example's palette counts as well as its layout: uploading the mirror image of an entry (its two colours on
    the other sides) ranks that entry, last by the layout alone, second — after the entry in the two colours' blend,
    which the layout favours — ahead of the entries in other colours."""
    svc = _colour_library(tmp_path / "noise_libraries", MIRROR_CASE)
    buf = io.BytesIO()
    _halves(BLUE, RED).save(buf, "PNG")
    ex = svc.add_example(buf.getvalue())
    kept = svc._example(ex["id"])
    # the two colours (as their palette cells' centres, within 8/255 a channel), half of the image each
    got_colours = sorted(kept.palette)
    assert [round(share, 2) for _, share in got_colours] == [0.5, 0.5], kept.palette
    for (hexcol, _), want in zip(got_colours, sorted([BLUE, RED])):
        assert np.abs(color.parse_hex_color(hexcol) - color.parse_hex_color(want)).max() <= 8 / 255, kept.palette
    got = svc.query({"library": "pics", "like_image": {"id": ex["id"], "weight": 2}, "limit": 4})
    assert got["example_by"] == ["colour", "palette"]
    seeds = [h["seed"] for h in got["hits"]]
    assert seeds[:2] == ["11", "10"], got["hits"]  # the blend (closest layout), then the mirror (same colours)
    terms = got["hits"][1]["terms"]
    assert terms["palette"]["raw"] > 0.95 and terms["layout"]["weighted"] < 0 < terms["palette"]["weighted"], terms
    # by the layout alone the blend comes first and the mirrored entry last
    by_layout = [h["seed"] for h in sorted(got["hits"], key=lambda h: -h["terms"]["layout"]["raw"])]
    assert by_layout[0] == "11" and by_layout[-1] == "10", by_layout


def test_more_like_a_hit_in_a_colour_only_library_also_matches_its_palette(tmp_path: Path) -> None:
    """'More like this' on an entry of a colour-only library: itself first, then its mirror image (same colours on
    the other sides: last by the layout alone) ahead of the entries in other colours."""
    svc = _colour_library(tmp_path / "noise_libraries", [*MIRROR_CASE, _halves(BLUE, RED)])
    got = svc.query({"library": "pics", "like": {"seed": 10}, "limit": 5})
    seeds = [h["seed"] for h in got["hits"]]
    assert seeds[0] == "10" and {"layout", "palette"} <= set(got["hits"][0]["terms"]), got["hits"]
    assert seeds.index("14") < min(seeds.index("12"), seeds.index("13")), got["hits"]
    by_layout = [h["seed"] for h in sorted(got["hits"], key=lambda h: -h["terms"]["layout"]["raw"])]
    assert by_layout[-1] == "14", by_layout


def test_bad_uploads_are_refused_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "noise_libraries"
    uploads = _image_library(root / "pics", True)
    svc = LibraryService(lambda: [root], lambda ident: ImageEmbedder())
    big, bomb = io.BytesIO(), io.BytesIO()
    Image.new("1", (12_000, 6_000)).save(big, "PNG")  # a small file, 72 megapixels when decoded
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 megapixels: past Pillow's own bomb limit too
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    for data, word in [(b"", "empty"), (b"hello, not an image", "not an image"), (uploads[0][: len(uploads[0]) // 2], "truncated"),
                       (big.getvalue(), "megapixels"), (bomb.getvalue(), "too large"), (gif.getvalue(), "not an image"),
                       (b"\x89PNG" + b"0" * (8 * 1024 * 1024), "at most")]:
        with pytest.raises(QueryError, match=word):
            svc.add_example(data)
    ok = svc.add_example(uploads[0])["id"]
    for body, word in [({"library": "pics", "like_image": {"id": "../../etc/passwd"}}, "not an example handle"),
                       ({"library": "pics", "like_image": {"id": "0" * 32}}, "Upload the image again"),
                       ({"library": "pics", "like_image": {"id": ok, "weight": float("nan")}}, "like_image.weight"),
                       ({"library": "pics", "like_image": {"id": ok}, "like": {"seed": 10}}, "one example"),
                       ({"library": "pics", "like_image": ok}, "JSON object")]:
        with pytest.raises(QueryError, match=word):
            svc.query(body)
