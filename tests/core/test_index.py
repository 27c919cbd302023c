"""Approximate index: recall against exact search, persistence, staying in step with appends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEmbedder
from helpers_lib import (
    feature_set,  # noqa: E402
    rows,
)

from noisequery_core.library.manifest import ClipIdentity, GenerationKey
from noisequery_core.library.storage import Library
from noisequery_core.search import index as nq_index
from noisequery_core.search.index import ClipSearcher, exact_topk, load_index, maintain_index
from noisequery_core.search.query import Query, Searcher


def clustered(n: int, dim: int, rng: np.random.Generator, k: int = 64) -> np.ndarray:
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def big_library(tmp_path: Path) -> Library:
    rng = np.random.default_rng(0)
    dim, n = 32, 6000
    lib = Library.create(tmp_path / "lib", GenerationKey(), feature_set(dim))
    x = clustered(n, dim, rng)
    with lib.writer(durable=False) as w:
        w.append(np.arange(n, dtype=np.uint64) * 7 + 2**63, rows(n, dim, rng, clip=x))
    return lib


def test_ivf_recall_and_persistence(big_library: Library) -> None:
    lib = big_library
    with lib.writer():
        info = maintain_index(lib, exact_max=1000)
    assert info is not None and info.ntotal == lib.count
    assert (lib.path / "index" / "clip.faiss").exists() and (lib.path / "index" / "clip.json").exists()
    cs = ClipSearcher(lib, exact_max=1000)
    assert cs.mode == "ivfpq"
    rng = np.random.default_rng(1)
    emb = np.asarray(lib.column("clip"), np.float32)
    recall = []
    for r in rng.choice(lib.count, 50, replace=False):
        q = emb[r] + 0.05 * rng.standard_normal(emb.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        got, scores = cs.search(q, 10)
        truth, _ = exact_topk(emb, q, 10)
        recall.append(len(set(got) & set(truth)) / 10)
        assert np.allclose(scores, emb[got] @ q, atol=1e-5), "scores are exact cosines"
    assert np.mean(recall) >= 0.95


def test_index_follows_appends_and_rebuilds_damage(big_library: Library) -> None:
    lib = big_library
    with lib.writer():
        maintain_index(lib, exact_max=1000)
    rng = np.random.default_rng(5)
    extra = clustered(500, 32, rng)
    with lib.writer(durable=False) as w:
        w.append(np.arange(500, dtype=np.uint64) + 10, rows(500, 32, rng, clip=extra))
    # a reader catches up in memory without writing
    cs = ClipSearcher(lib, exact_max=1000)
    got, _ = cs.search(extra[3], 1)
    assert int(lib.seeds[got[0]]) == 13
    assert load_index(lib)[1].ntotal == 6000  # type: ignore[index]
    with lib.writer():
        info = maintain_index(lib, exact_max=1000)
    assert info is not None and info.ntotal == 6500 and load_index(lib)[1].ntotal == 6500  # type: ignore[index]
    (lib.path / "index" / "clip.faiss").write_bytes(b"garbage")
    assert load_index(lib) is None
    with lib.writer():
        info = maintain_index(lib, exact_max=1000)
    assert info is not None and info.ntotal == 6500


def test_combined_query_on_ivf_matches_exact(big_library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text + colour through the ANN path returns the same top hits as the exact path."""
    lib = big_library
    ident = lib.features.clip
    assert ident is not None
    q = np.asarray(lib.column("clip")[42], np.float32)

    class VecEmbedder(FakeEmbedder):
        def encode_text(self, texts: list[str]) -> np.ndarray:
            return q[None]

    emb = VecEmbedder(ClipIdentity(ident.model, ident.pretrained, ident.dim))
    query = Query(text="x", colors=(("#336699", 0.5),), top_k=5)
    with lib.writer():
        maintain_index(lib, exact_max=1000)
    approx = Searcher(lib, embedder=emb, exact_max=1000).search(query)
    exact = Searcher(lib, embedder=emb, exact_max=10**9).search(query)
    assert [h.seed for h in approx] == [h.seed for h in exact]
    assert approx[0].seed == int(lib.seeds[42])


def test_default_threshold_keeps_small_libraries_exact(big_library: Library) -> None:
    """With the default threshold (EXACT_MAX) a library of this size is searched exactly and gets no index file;
    one entry past the threshold switches to the approximate index."""
    lib = big_library
    assert lib.count <= nq_index.EXACT_MAX
    with lib.writer():
        assert maintain_index(lib) is None
    assert not (lib.path / "index" / "clip.faiss").exists()
    assert ClipSearcher(lib).mode == "exact"
    assert ClipSearcher(lib, exact_max=lib.count).mode == "exact"
    assert ClipSearcher(lib, exact_max=lib.count - 1).mode == "ivfpq"


def test_index_build_honours_check_cancel_and_keeps_rows(big_library: Library) -> None:
    """The long-work contract reaches index building: a stop saves no index and loses no committed row."""
    from noisequery_core.errors import Cancelled

    lib = big_library
    calls = {"n": 0}

    def stop_on_second() -> None:  # call 1: before training; call 2: before the first chunk of rows
        calls["n"] += 1
        if calls["n"] == 2:
            raise Cancelled("stop")

    count = lib.count
    with lib.writer():
        with pytest.raises(Cancelled):
            maintain_index(lib, exact_max=1000, check_cancel=stop_on_second)
    assert calls["n"] == 2
    assert load_index(Library.open(lib.path)) is None  # nothing half-built was saved
    assert Library.open(lib.path).count == count
    with lib.writer():
        assert maintain_index(lib, exact_max=1000) is not None  # a re-run builds it
