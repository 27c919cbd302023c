"""The fast query paths agree with scoring every row exactly: threshold top-k, ANN ∪ colour candidates,
CLIP term statistics from the sample's moments, lazily built scan columns, the one-pass tuner truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEmbedder
from helpers_lib import feature_set, rows

from noisequery_core.library.manifest import ClipIdentity, GenerationKey
from noisequery_core.library.storage import Library
from noisequery_core.search import color, palette
from noisequery_core.search.index import exact_topk, exact_topk_many, maintain_index
from noisequery_core.search.mapped import release_pages, transposed
from noisequery_core.search.query import Query, RegionTarget, Searcher, StatTarget, top_indices
from noisequery_core.search.terms import ScanColumns, color_term, region_term, stat_term

DIM = 32


def varied_rows(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows with clustered CLIP vectors and a different random palette per entry (colour terms rank them)."""
    centres = rng.standard_normal((48, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 48, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
    cols = rows(n, DIM, rng, clip=x / np.linalg.norm(x, axis=1, keepdims=True))
    lab = np.stack([rng.uniform(5, 95, (n, palette.PALETTE_SIZE)), rng.uniform(-60, 60, (n, palette.PALETTE_SIZE)),
                    rng.uniform(-60, 60, (n, palette.PALETTE_SIZE))], axis=-1)
    spread = rng.integers(0, 200, (n, palette.PALETTE_SIZE))
    cols["palette"] = np.stack([palette.code_of_lab(lab), spread], axis=-1).astype(np.uint16)
    mass = rng.gamma(0.5, 1.0, (n, len(color.REGION_NAMES), palette.PALETTE_SIZE)) + 1e-6
    cols["palette_shares"] = np.rint(mass / mass.sum(-1, keepdims=True) * 255).astype(np.uint8)
    return cols


def make(path: Path, n: int, seed: int) -> Library:
    lib = Library.create(path, GenerationKey(), feature_set(DIM))
    with lib.writer(durable=False) as w:
        w.append(np.arange(n, dtype=np.uint64) * 3 + 11, varied_rows(n, np.random.default_rng(seed)))
    return lib


@pytest.fixture(scope="module")
def ivf_library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    """6,000 entries with a saved IVF-PQ index (searched approximately with exact_max=1000)."""
    lib = make(tmp_path_factory.mktemp("speed") / "lib", 6000, 0)
    with lib.writer():
        assert maintain_index(lib, exact_max=1000) is not None
    return Library.open(lib.path)


@pytest.fixture(scope="module")
def small_library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    """300 entries: fewer than the statistics sample, so every term is standardised over all rows."""
    return make(tmp_path_factory.mktemp("speed_small") / "lib", 300, 1)


class VecEmbedder(FakeEmbedder):
    """Text "q<i>" ↦ the i-th of the given vectors."""

    def __init__(self, identity: ClipIdentity, vectors: np.ndarray):
        super().__init__(identity)
        self.vectors = vectors

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[int(t[1:])] for t in texts])


def reference_top(values: np.ndarray, m: int) -> np.ndarray:
    """Best first, ties to the lower index, NaN last: a full lexicographic sort."""
    key = np.where(np.isnan(values), np.inf, -values.astype(np.float64))
    return np.lexsort((np.arange(len(values)), key))[:m]


@pytest.mark.parametrize("n", [7, 5000, 200_000])
@pytest.mark.parametrize("m", [1, 10, 500])
@pytest.mark.parametrize("layout", ["random", "ascending", "descending", "ties", "nan"])
def test_top_indices_is_a_full_sort(n: int, m: int, layout: str) -> None:
    rng = np.random.default_rng(n + m)
    v = rng.standard_normal(n).astype(np.float32)
    if layout == "ascending":
        v.sort()
    elif layout == "descending":
        v = -np.sort(v)
    elif layout == "ties":
        v = np.round(v * 2) / 2  # a handful of distinct values, thousands of ties at the cut
    elif layout == "nan":
        v[rng.choice(n, max(1, n // 3), replace=False)] = np.nan
    got = top_indices(v, m)
    assert np.array_equal(got, reference_top(v, m))


def test_top_indices_edge_cases() -> None:
    assert top_indices(np.zeros(0, np.float32), 5).shape == (0,)
    assert np.array_equal(top_indices(np.array([1.0, 3.0, 2.0], np.float32), 10), [1, 2, 0])
    all_nan = np.full(100_000, np.nan, np.float32)
    assert np.array_equal(top_indices(all_nan, 3), [0, 1, 2])


QUERIES = [
    dict(colors=(("#FF8800", 1.0),)),
    dict(colors=(("#FF8800", 2.0), ("#2050C0", 1.0)), stats=(StatTarget("brightness", 0.7),)),
    dict(stats=(StatTarget("contrast", lo=0.2, hi=0.5, weight=2.0),), regions=(RegionTarget("top", lightness=0.8),)),
    dict(colors=(("#30A040", 1.5),), negative_text="q5"),
]


def ivf_searcher(lib: Library, n: int) -> tuple[Searcher, int]:
    """A searcher on the index whose texts "q<i>" are n library rows plus a little noise."""
    ident = lib.features.clip
    assert ident is not None
    rng = np.random.default_rng(3)
    base = np.asarray(lib.column("clip")[rng.choice(lib.count, n, replace=False)], np.float32)
    vecs = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    s = Searcher(lib, embedder=VecEmbedder(ident, vecs), exact_max=1000)
    assert s.clip_searcher().mode == "ivfpq"
    return s, n


def test_text_query_on_the_index_has_exact_recall(ivf_library: Library) -> None:
    """Text alone through the index: its top-10 overlaps the exact one (the index's contract is recall)."""
    s, n = ivf_searcher(ivf_library, 20)
    overlap = []
    for i in range(n):
        q = Query(text=f"q{i}", top_k=10)
        fast, exact = s.search(q), s.search(q, exact=True)
        overlap.append(len({h.seed for h in fast} & {h.seed for h in exact}) / 10)
        assert fast[0].seed == exact[0].seed
        # Scores are exact cosines either way: a row found by both scores the same.
        both = {h.seed: h.score for h in exact}
        assert all(abs(h.score - both[h.seed]) < 1e-4 for h in fast if h.seed in both)
    assert np.mean(overlap) >= 0.9


@pytest.mark.parametrize("parts", QUERIES)
def test_ann_paths_return_the_exact_top_k(ivf_library: Library, parts: dict) -> None:
    """Text + colour terms through the index (ANN candidates ∪ best by colour) give the same top-10, in order,
    as every row scored exactly."""
    lib = ivf_library
    s, n = ivf_searcher(lib, 8)
    for i in range(n):
        q = Query(text=f"q{i}", top_k=10, exclude_seeds=(int(lib.seeds[7]),), **parts)
        fast = s.search(q)
        exact = s.search(q, exact=True)
        assert [h.seed for h in fast] == [h.seed for h in exact]
        assert np.allclose([h.score for h in fast], [h.score for h in exact], atol=1e-4)
        assert int(lib.seeds[7]) not in {h.seed for h in fast}


def test_colour_scan_is_the_weighted_sum_of_z_scores(small_library: Library) -> None:
    """A colour + statistic + region query ranks every row by Σ weight · z, z over the library (all rows here)."""
    lib = small_library
    q = Query(colors=(("#FF8800", 1.0),), stats=(StatTarget("brightness", 0.3, weight=0.5),),
              regions=(RegionTarget("center", color="#2050C0", weight=2.0), RegionTarget("top", lightness=0.9)),
              top_k=25)
    cols = ScanColumns(lib)
    terms = [color_term(cols, "#FF8800", 1.0), stat_term(cols, q.stats[0]), *(region_term(cols, r) for r in q.regions)]
    total = np.zeros(lib.count)
    for t in terms:
        raw = t.score(None).astype(np.float64)
        total += t.weight * (raw - raw.mean()) / raw.std()
    want = reference_top(total.astype(np.float32), 25)
    hits = Searcher(lib).search(q)
    assert [h.row for h in hits] == want.tolist()
    assert np.allclose([h.score for h in hits], total[want], atol=1e-4)
    assert np.allclose([sum(ts.weighted for ts in h.terms.values()) for h in hits], total[want], atol=1e-4)


def test_clip_term_statistics_from_the_sample_moments(small_library: Library) -> None:
    """The folded CLIP terms (mean and covariance of the sample) standardise exactly like the raw cosines would."""
    lib = small_library
    ident = lib.features.clip
    assert ident is not None
    rng = np.random.default_rng(9)
    vecs = rng.standard_normal((2, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    emb = np.asarray(lib.column("clip"), np.float64)
    hits = Searcher(lib, embedder=VecEmbedder(ident, vecs)).search(
        Query(text="q0", negative_text="q1", negative_weight=0.5, top_k=lib.count))
    total = np.zeros(lib.count)
    for v, w, name in ((vecs[0], 1.0, "text"), (vecs[1], -0.5, "negative_text")):
        raw = emb @ v
        z = (raw - raw.mean()) / raw.std()
        total += w * z
        for h in hits[:20]:
            assert h.terms[name].z == pytest.approx(z[h.row], abs=1e-4)
    assert [h.row for h in hits[:20]] == reference_top(total.astype(np.float32), 20).tolist()


def test_scan_columns_hold_only_what_was_asked(small_library: Library) -> None:
    """Statistic and region-lightness columns are copied on first use, equal to the stored ones."""
    lib = small_library
    cols = ScanColumns(lib)
    b = color.STAT_INDEX["brightness"]
    assert np.array_equal(cols.stat(b), np.asarray(lib.column("stats"))[:, b])
    assert cols.stat(b) is cols.stat(b)
    r = color.REGION_NAMES.index("top")
    assert np.array_equal(cols.region_lightness(r), np.asarray(lib.column("regions"))[:, r, 0])
    assert cols.stat(b).flags.c_contiguous and cols.region_lightness(r).flags.c_contiguous


def test_released_pages_read_back_unchanged(small_library: Library) -> None:
    col = small_library.column("palette_shares")
    before = np.array(col)
    release_pages(col)
    assert np.array_equal(np.asarray(col), before)
    moved = transposed(col, (2,), chunk=64)
    assert np.array_equal(moved, before[:, 2].T)
    release_pages(np.zeros(3))  # not a map: nothing happens


def test_exact_topk_many_matches_one_pass_per_query() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((150_000, 24)).astype(np.float16)
    q = rng.standard_normal((9, 24)).astype(np.float32)
    got = exact_topk_many(x, q, 10)
    for i in range(len(q)):
        assert np.array_equal(got[i], exact_topk(x, q[i], 10)[0])


def test_searcher_sees_every_commit_of_another_writer(tmp_path: Path) -> None:
    """The manifest is re-read only when its file changed: back-to-back commits from another handle are all seen."""
    lib = make(tmp_path / "lib", 50, 2)
    s = Searcher(lib)
    q = Query(stats=(StatTarget("brightness", 1.0),), top_k=1)
    s.search(q)
    other = Library.open(lib.path)
    for i in range(3):
        extra = varied_rows(1, np.random.default_rng(10 + i))
        extra["stats"][:] = 1.0  # the brightest entry: the new top hit
        with other.writer(durable=False) as w:
            w.append([10_000 + i], extra)
        assert s.search(q)[0].seed in {10_000 + j for j in range(i + 1)}
        assert lib.count == 51 + i
