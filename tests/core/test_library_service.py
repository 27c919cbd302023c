"""The library browser's service (search/service.py) without a host: listing, paging, caches, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import COLOR_WORDS, FakeEmbedder
from helpers_lib import make_library, rows

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
    from noisequery_core.search.service import ShortTextEncoder

    assert ShortTextEncoder.applies(tiny_clip) and not ShortTextEncoder.applies(FakeEmbedder())
    short = ShortTextEncoder(tiny_clip)
    texts = ["a red square", "a much longer text about a blue circle on a green field at night"]
    got = short.encode_text(texts)
    assert short._ok  # the first-use check against the full encoder passed
    assert np.allclose(got, tiny_clip.encode_text(texts), atol=1e-5)
    assert np.allclose(short.encode_text(texts[:1]), tiny_clip.encode_text(texts[:1]), atol=1e-5)
