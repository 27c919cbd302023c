"""Nearest-neighbour search over a library's CLIP embeddings (faiss-cpu).

Small libraries are searched exactly (float32 copy in RAM, one matrix-vector product).
From ``EXACT_MAX`` entries on, an IVF-PQ index gives candidates that are re-ranked exactly
with the stored float16 embeddings, so scores are always exact cosines and memory stays
near the fp16 size. The index lives in ``<library>/index/`` with ``clip.json`` describing
it (autofaiss-style); it is derived data: deleting it only costs a rebuild. Rows, not
seeds, are faiss ids (faiss ids are int64, seeds are uint64).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, QueryError
from ..library.manifest import atomic_write_bytes
from ..library.storage import Library
from ..work import Progress, no_progress

log = logging.getLogger("noisequery")

EXACT_MAX = 20_000
INDEX_DIR = "index"
# PQ codes only shortlist: this many candidates (at least) are re-ranked with the exact fp16
# embeddings. Re-ranking 500 rows costs ~1 ms; with fewer, PQ error caps recall on dense data.
RERANK_MIN = 500
RERANK_FACTOR = 10
RECALL_TARGET = 0.97  # tuned on held-out queries; the contract is ≥ 0.95 recall@10
_CHUNK = 65_536


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError("Searching needs faiss: `pip install faiss-cpu`.") from exc
    return faiss


@dataclass(frozen=True)
class IndexInfo:
    kind: str  # "ivfpq"
    nlist: int
    m: int
    nprobe: int
    ntotal: int
    trained_on: int
    clip: str
    recall_at_10: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def exact_topk(matrix: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``matrix @ q`` (chunked, works on fp16 memory maps)."""
    n = matrix.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    best_rows = np.zeros(0, np.int64)
    best_scores = np.zeros(0, np.float32)
    for start in range(0, n, _CHUNK):
        s = _f32(matrix[start : start + _CHUNK]) @ q
        kk = min(k, len(s))
        part = np.argpartition(-s, kk - 1)[:kk]
        best_rows = np.concatenate([best_rows, part + start])
        best_scores = np.concatenate([best_scores, s[part]])
        if len(best_rows) > k:
            keep = np.argpartition(-best_scores, k - 1)[:k]
            best_rows, best_scores = best_rows[keep], best_scores[keep]
    order = np.argsort(-best_scores, kind="stable")
    return best_rows[order].astype(np.int64), best_scores[order].astype(np.float32)


class ClipSearcher:
    """Answers inner-product queries over one library's CLIP column."""

    def __init__(self, library: Library, *, exact_max: int = EXACT_MAX):
        if not library.has_clip:
            raise QueryError(
                f"Library {library.path} has no CLIP features (built with CLIP model 'none'), so it cannot be searched "
                "by text or example image. Use colour queries, or rebuild/import it with a CLIP model."
            )
        self.library = library
        self.exact_max = exact_max
        self._count = -1
        self._dense: np.ndarray | None = None
        self._ivf: Any = None
        self.info: IndexInfo | None = None

    @property
    def embeddings(self) -> np.ndarray:
        return self.library.column("clip")

    @property
    def mode(self) -> str:
        self._sync()
        return "exact" if self._ivf is None else "ivfpq"

    def _sync(self) -> None:
        n = self.library.count
        if n == self._count:
            return
        if n <= self.exact_max:
            self._dense = _f32(self.embeddings)
            self._ivf = None
        else:
            self._dense = None
            self._ivf, self.info = ensure_index(self.library, persist=False)
        self._count = n

    def search(self, q: np.ndarray, k: int, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact inner products of the (approximately) top-k rows for query vector ``q``."""
        self._sync()
        q = _f32(q).reshape(-1)
        k = min(int(k), self.library.count)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self._dense is not None:
            return exact_topk(self._dense, q, k)
        if exact:
            return exact_topk(self.embeddings, q, k)
        kprime = rerank_pool(k, self.library.count)
        self._ivf.nprobe = self.info.nprobe if self.info else 16
        _, ids = self._ivf.search(q[None, :], kprime)
        rows = ids[0][ids[0] >= 0]
        scores = self.scores(rows, q)
        order = np.argsort(-scores, kind="stable")[:k]
        return rows[order].astype(np.int64), scores[order]

    def all_scores(self, q: np.ndarray) -> np.ndarray | None:
        """Inner products of every row with ``q`` in exact mode (None in ANN mode)."""
        self._sync()
        return None if self._dense is None else self._dense @ _f32(q).reshape(-1)

    def scores(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact inner products of the given rows with ``q``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        if self._dense is not None and self._count == self.library.count:
            return self._dense[rows] @ _f32(q)
        order = np.argsort(rows)
        out = np.empty(len(rows), np.float32)
        out[order] = _f32(self.embeddings[rows[order]]) @ _f32(q)
        return out


def rerank_pool(k: int, n: int) -> int:
    return min(n, max(RERANK_FACTOR * k, RERANK_MIN))


def _index_paths(library: Library) -> tuple[Path, Path]:
    d = library.path / INDEX_DIR
    return d / "clip.faiss", d / "clip.json"


def _choose_params(n: int, dim: int) -> tuple[int, int]:
    nlist = int(2 ** round(math.log2(max(64.0, 2 * math.sqrt(n)))))
    nlist = min(nlist, 4096)
    m = dim // 8 if dim % 8 == 0 else dim // 4 if dim % 4 == 0 else dim // 2
    return nlist, max(1, m)


def build_index(library: Library, *, progress: Progress = no_progress) -> tuple[Any, IndexInfo]:
    """Train an IVF-PQ index on the library's embeddings, add all rows and tune nprobe.

    ``progress`` (noisequery_core.work) counts rows added to the index, after training on a sample.
    """
    faiss = _faiss()
    emb = library.column("clip")
    n, dim = emb.shape
    nlist, m = _choose_params(n, dim)
    rng = np.random.default_rng(0)
    ntrain = min(n, max(40 * nlist, 20_000))
    sample = np.sort(rng.choice(n, size=ntrain, replace=False))
    xt = _f32(emb[sample])
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    log.info("training IVF%d,PQ%d on %d of %d vectors", nlist, m, ntrain, n)
    progress(0, n, f"training the index on {ntrain} vectors")
    index.train(xt)
    _add_rows(index, emb, 0, n, progress)
    nprobe, recall = _tune_nprobe(index, emb, rng)
    info = IndexInfo("ivfpq", nlist, m, nprobe, n, n, library.features.clip.describe() if library.features.clip else "", recall)
    return index, info


def _add_rows(index: Any, emb: np.ndarray, start: int, stop: int, progress: Progress = no_progress) -> None:
    for s in range(start, stop, _CHUNK):
        e = min(stop, s + _CHUNK)
        index.add_with_ids(_f32(emb[s:e]), np.arange(s, e, dtype=np.int64))
        progress(e - start, stop - start, "adding rows to the index")


def _tune_nprobe(index: Any, emb: np.ndarray, rng: np.random.Generator, nq: int = 100) -> tuple[int, float]:
    """Smallest nprobe whose recall@10 (after exact re-ranking) reaches RECALL_TARGET on held-out queries."""
    n, dim = emb.shape
    rows = rng.choice(n, size=min(nq, n), replace=False)
    q = _f32(emb[np.sort(rows)])
    q = q + rng.standard_normal(q.shape).astype(np.float32) * 0.5 / math.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = [set(exact_topk(emb, qi, 10)[0].tolist()) for qi in q]
    recall = 0.0
    nprobe = 1
    for nprobe in (4, 8, 16, 32, 64, 128, 256):
        if nprobe > index.nlist:
            break
        index.nprobe = nprobe
        _, ids = index.search(q, rerank_pool(10, n))
        hits = 0
        for i, qi in enumerate(q):
            cand = ids[i][ids[i] >= 0]
            sc = _f32(emb[np.sort(cand)]) @ qi
            top = np.sort(cand)[np.argsort(-sc)[:10]]
            hits += len(truth[i] & set(top.tolist()))
        recall = hits / (10 * len(q))
        if recall >= RECALL_TARGET:
            break
    return nprobe, recall


def load_index(library: Library) -> tuple[Any, IndexInfo] | None:
    faiss = _faiss()
    fidx, finfo = _index_paths(library)
    if not (fidx.exists() and finfo.exists()):
        return None
    try:
        info = IndexInfo(**json.loads(finfo.read_text()))
        index = faiss.read_index(str(fidx))
    except Exception as exc:  # a damaged derived file is rebuilt, never fatal
        log.warning("index in %s is unreadable (%s); it will be rebuilt", fidx.parent, exc)
        return None
    if index.ntotal != info.ntotal or info.ntotal > library.count:
        log.warning("index in %s does not match the library; it will be rebuilt", fidx.parent)
        return None
    return index, info


def save_index(library: Library, index: Any, info: IndexInfo) -> None:
    faiss = _faiss()
    fidx, finfo = _index_paths(library)
    fidx.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".clip.", suffix=".tmp", dir=fidx.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, fidx)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_bytes(finfo, json.dumps(info.to_json(), indent=2).encode())


def ensure_index(library: Library, *, persist: bool, progress: Progress = no_progress) -> tuple[Any, IndexInfo]:
    """The library's IVF-PQ index, brought up to date with its committed rows.

    Rows appended since the index was saved are added; an index trained on far fewer rows
    than the library now holds (< 1/4) is rebuilt. With ``persist`` the result is saved
    atomically (writers do this after committing; readers catch up in memory only).
    ``progress`` (noisequery_core.work) counts rows added, when there are any.
    """
    got = load_index(library)
    n = library.count
    if got is not None and got[1].trained_on * 4 >= n:
        index, info = got
        if info.ntotal < n:
            _add_rows(index, library.column("clip"), info.ntotal, n, progress)
            info = IndexInfo(**{**info.to_json(), "ntotal": n})
            if persist:
                save_index(library, index, info)
        return index, info
    index, info = build_index(library, progress=progress)
    if persist:
        save_index(library, index, info)
    return index, info


def maintain_index(library: Library, *, exact_max: int = EXACT_MAX, progress: Progress = no_progress) -> IndexInfo | None:
    """Bring the persisted index in step with the committed rows (call with the writer lock held)."""
    if not library.has_clip or library.count <= exact_max:
        return None
    return ensure_index(library, persist=True, progress=progress)[1]
