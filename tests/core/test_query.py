"""Queries: colour, statistics, regions, layout, text (fake CLIP), combined, diversity, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import COLOR_WORDS, FakeEmbedder, halves, solid
from helpers_lib import make_library

from noisequery_core import FeatureExtractor, Library, Query, QueryError, RegionTarget, Searcher, StatTarget
from noisequery_core.library.manifest import ClipIdentity, FeatureSet, GenerationKey
from noisequery_core.search import color

PALETTE = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 220),
    "yellow": (240, 230, 30),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "orange": (255, 136, 0),
    "purple": (130, 30, 160),
}


@pytest.fixture(scope="module")
def colour_library_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 entries: 5 per colour word; seed = 100·word index + i; CLIP rows = fake word vectors."""
    fs = FeatureSet(clip=FakeEmbedder().identity, color_version=color.COLOR_VERSION, thumbnail_size=16)
    lib = Library.create(tmp_path_factory.mktemp("q") / "lib", GenerationKey(model="m"), fs)
    rng = np.random.default_rng(0)
    seeds, images, clip = [], [], []
    for wi, word in enumerate(COLOR_WORDS):
        for i in range(5):
            jitter = rng.integers(-15, 16, 3)
            rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[word], jitter))
            seeds.append(100 * wi + i)
            images.append(solid(rgb, 48))
            clip.append(FakeEmbedder.vector(word, noise=0.1, rng=rng))
    fx = FeatureExtractor(FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=16), None)
    cols, thumbs = fx(images)
    cols["clip"] = np.stack(clip).astype(np.float16)
    with lib.writer(durable=False) as w:
        w.append(seeds, cols, thumbs)
    return lib.path


@pytest.fixture
def colour_library(colour_library_dir: Path, tmp_path: Path) -> Library:
    """A private copy per test (some tests append to it)."""
    import shutil

    shutil.copytree(colour_library_dir, tmp_path / "lib")
    return Library.open(tmp_path / "lib")


def word_of(seed: int) -> str:
    return COLOR_WORDS[seed // 100]


def test_dominant_colour(colour_library: Library) -> None:
    hits = Searcher(colour_library).search(Query(colors=(("#FF8800", 1.0),), top_k=5))
    assert [word_of(h.seed) for h in hits] == ["orange"] * 5
    assert hits[0].thumbnail is not None and hits[0].thumbnail.exists()
    assert "color #FF8800" in hits[0].terms
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_stat_target_and_range(colour_library: Library) -> None:
    s = Searcher(colour_library)
    dark = s.search(Query(stats=(StatTarget("brightness", target=0.0),), top_k=5))
    assert {word_of(h.seed) for h in dark} == {"black"}
    mid = s.search(Query(stats=(StatTarget("brightness", lo=0.95, hi=1.0),), top_k=5))
    assert {word_of(h.seed) for h in mid} == {"white"}
    grey = s.search(Query(stats=(StatTarget("colorfulness", hi=0.1),), top_k=10))
    assert {word_of(h.seed) for h in grey} == {"white", "black"}


def test_text_query_with_negative(colour_library: Library, fake_embedder: FakeEmbedder) -> None:
    s = Searcher(colour_library, embedder=fake_embedder)
    hits = s.search(Query(text="blue", top_k=5))
    assert {word_of(h.seed) for h in hits} == {"blue"}
    assert hits[0].terms["text"].raw > 0.7
    both = s.search(Query(text="blue green", negative_text="green", negative_weight=2.0, top_k=5))
    assert {word_of(h.seed) for h in both} == {"blue"}


def test_combined_text_and_colour(colour_library: Library, fake_embedder: FakeEmbedder) -> None:
    """'red orange' is ambiguous for the text term; the colour term decides."""
    s = Searcher(colour_library, embedder=fake_embedder)
    q = Query(text="red orange", colors=(("#FF8800", 2.0),), top_k=5)
    hits = s.search(q)
    assert {word_of(h.seed) for h in hits} == {"orange"}
    assert set(hits[0].terms) == {"text", "color #FF8800"}
    q_red = Query(text="red orange", colors=(("#DC1414", 2.0),), top_k=5)
    assert {word_of(h.seed) for h in s.search(q_red)} == {"red"}


def test_regions_and_layout(tmp_path: Path) -> None:
    fs = FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=0)
    lib = Library.create(tmp_path / "lib", GenerationKey(), fs)
    imgs = [halves((250, 250, 250), (20, 30, 200)), halves((20, 30, 200), (250, 250, 250)), solid((128, 128, 128)), halves((0, 0, 0), (255, 255, 0))]
    cols, _ = FeatureExtractor(fs, None)(imgs)
    with lib.writer(durable=False) as w:
        w.append([10, 11, 12, 13], cols)
    s = Searcher(lib)
    hits = s.search(Query(regions=(RegionTarget("top", lightness=0.95), RegionTarget("bottom", color="#1420C8")), top_k=1))
    assert hits[0].seed == 10
    example = color.analyse([halves((0, 0, 0), (250, 240, 10))]).layout[0]
    assert s.search(Query(layout=example, top_k=1))[0].seed == 13


def test_exclusion_top_k_and_diversity(colour_library: Library, fake_embedder: FakeEmbedder) -> None:
    s = Searcher(colour_library, embedder=fake_embedder)
    hits = s.search(Query(text="orange", exclude_seeds=(600, 601), top_k=3))
    assert {h.seed for h in hits}.isdisjoint({600, 601})
    everything = s.search(Query(colors=(("#FF0000", 1.0),), top_k=1000))
    assert len(everything) == colour_library.count
    assert len({h.seed for h in everything}) == colour_library.count
    emb = np.asarray(colour_library.column("clip"), np.float32)

    def mean_pairwise_sim(hits: list) -> float:  # type: ignore[type-arg]
        e = emb[[h.row for h in hits]]
        sim = e @ e.T
        return float((sim.sum() - np.trace(sim)) / (len(hits) * (len(hits) - 1)))

    plain = s.search(Query(text="orange red", top_k=4))
    diverse = s.search(Query(text="orange red", top_k=4, diversity=0.3))
    assert diverse[0].seed == plain[0].seed  # MMR keeps the best hit first
    assert {word_of(h.seed) for h in diverse} <= {"orange", "red"}
    assert mean_pairwise_sim(diverse) < mean_pairwise_sim(plain)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query(top_k=0, colors=(("#fff", 1),)), "top_k must be at least 1"),
        (Query(colors=(("#fff", 1),), top_k=10**6), "larger than the maximum"),
        (Query(), "The query is empty"),
        (Query(colors=(("orange", 1),)), "is not a hex colour"),
        (Query(stats=(StatTarget("loudness", 1.0),)), "Unknown statistic 'loudness'"),
        (Query(stats=(StatTarget("brightness", 3.0),)), "outside its range"),
        (Query(stats=(StatTarget("brightness", lo=0.8, hi=0.2),)), "range low 0.8 is above high 0.2"),
        (Query(regions=(RegionTarget("middle", color="#fff"),)), "Unknown region 'middle'"),
        (Query(colors=(("#fff", 1),), diversity=2.0), "diversity must be between 0 and 1"),
    ],
)
def test_bad_queries(colour_library: Library, query: Query, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        Searcher(colour_library).search(query)


def test_text_query_needs_matching_clip(colour_library: Library, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="none was loaded"):
        Searcher(colour_library).search(Query(text="red"))
    other = FakeEmbedder(ClipIdentity("ViT-B-32", "openai", 16))
    with pytest.raises(QueryError, match="not comparable"):
        Searcher(colour_library, embedder=other).search(Query(text="red"))
    colour_only = make_library(tmp_path / "c", [1, 2], dim=None)
    with pytest.raises(QueryError, match="has no CLIP features"):
        Searcher(colour_only, embedder=FakeEmbedder()).search(Query(text="red"))


def test_empty_library(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "e", [], dim=None)
    with pytest.raises(QueryError, match="is empty"):
        Searcher(lib).search(Query(colors=(("#fff", 1),)))


def test_searcher_sees_new_entries(colour_library: Library) -> None:
    s = Searcher(colour_library)
    before = s.search(Query(colors=(("#00FFFF", 1),), top_k=1))[0]
    fs = FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=16)
    cols, thumbs = FeatureExtractor(fs, None)([solid((0, 255, 255))])
    cols["clip"] = FakeEmbedder.vector("x")[None].astype(np.float16)
    with Library.open(colour_library.path).writer(durable=False) as w:
        w.append([9999], cols, thumbs)
    after = s.search(Query(colors=(("#00FFFF", 1),), top_k=1))[0]
    assert before.seed != 9999 and after.seed == 9999


@pytest.mark.parametrize("make", [
    lambda: Query(text="a", text_weight=float("nan")),
    lambda: Query(negative_text="a", negative_weight=float("inf")),
    lambda: Query(colors=(("#FF8800", float("nan")),)),
    lambda: Query(diversity=float("nan")),
    lambda: Query(layout_weight=float("-inf")),
    lambda: StatTarget("brightness", target=0.5, weight=float("nan")),
    lambda: StatTarget("brightness", lo=float("nan"), hi=0.5),
    lambda: RegionTarget("top", lightness=float("nan")),
    lambda: RegionTarget("top", color="#FFFFFF", weight=float("inf")),
])
def test_non_finite_query_numbers_are_refused(make) -> None:
    """A NaN weight makes every score NaN, and the hits come back in file order as if ranked."""
    with pytest.raises(QueryError, match="NaN|infinity"):
        make()


def test_nan_stat_argument_is_refused() -> None:
    from noisequery_core.search.query import parse_stat_arg

    with pytest.raises(QueryError, match="brightness target is NaN"):
        parse_stat_arg("brightness", "nan")
    with pytest.raises(QueryError, match="brightness weight is NaN"):
        parse_stat_arg("brightness", "0.5", float("nan"))
    assert parse_stat_arg("brightness", "0.2:0.4", 2.0) == StatTarget("brightness", lo=0.2, hi=0.4, weight=2.0)
