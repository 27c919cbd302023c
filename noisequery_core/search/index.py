"""Nearest-neighbour search over a library's CLIP embeddings (faiss-cpu).

Small libraries are searched exactly (float32 copy in RAM, one matrix-vector product).
From ``EXACT_MAX`` entries on, an IVF-PQ index gives candidates that are re-ranked exactly
with the stored float16 embeddings, so scores are always exact cosines and memory stays
near the fp16 size. The index lives in ``<library>/index/`` with ``clip.json`` describing
it (autofaiss-style); it is derived data: deleting it only costs a rebuild. Rows, not
seeds, are faiss ids (faiss ids are int64, seeds are uint64).

A shared library's index is untrusted: ``clip.json`` records the SHA-256 of ``clip.faiss``
and a fingerprint of the rows it covers, and an index that fails any check (checksum,
dimension, training state, row count, another library's rows) is ignored with a warning and
rebuilt (in memory for readers, on disk by the next writer), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LibraryError, MissingDependencyError, QueryError
from ..library import safefs
from ..library.manifest import atomic_write_bytes, parse_json
from ..library.storage import Library
from ..work import CheckCancel, Progress, never_cancel, no_progress

log = logging.getLogger("noisequery")

EXACT_MAX = 20_000
INDEX_DIR = "index"  # = storage.INDEX_DIR
# An IVF index needs enough rows to train (faiss wants ~39 per list, and there are at least 64
# lists); below this a library is always searched exactly, whatever exact_max says.
IVF_MIN_ROWS = 40 * 64
INDEX_FORMAT = 2  # clip.json layout; 1 (no checksum) is rebuilt
_INFO_MAX_BYTES = 64 << 10
# PQ codes only shortlist: this many candidates (at least) are re-ranked with the exact fp16
# embeddings. Re-ranking 500 rows costs ~1 ms; with fewer, PQ error caps recall on dense data.
RERANK_MIN = 500
RERANK_FACTOR = 10
RECALL_TARGET = 0.99  # recall@10 the nprobe tuner aims at on its held-out queries
TUNE_QUERIES = 256  # held-out queries of the nprobe tuner (exact truth for all of them in one pass)
# Fewer lists would halve a 1M build's coarse assignment, but 1,024 lists at 1M × 512 (benchmark data)
# reached recall@10 0.963 at nprobe 8 where 2,048 reach 0.993.
NLIST_MAX = 4096
# k-means iterations of the coarse quantizer and of each PQ sub-quantizer. faiss' default for PQ is 25;
# the codes only shortlist candidates for the exact re-ranking, and 10 give the same recall@10 after it
# (1M × 512, 1,024 lists: 0.929 / 0.963 / 0.981 / 0.994 at nprobe 4 / 8 / 16 / 32 either way) for less than
# half the training CPU (47 → 22 s).
IVF_ITERS = 10
PQ_ITERS = 10
_CHUNK = 65_536
# Below this many rows a matrix-vector product runs in numpy's own single-threaded loop (np.einsum)
# instead of BLAS: OpenBLAS spreads even a 500 × 512 product over every core, and on a busy machine
# (ComfyUI sampling, other jobs) each query then waits whole scheduler ticks for the second thread.
_SMALL_MATVEC = 8192


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


def matvec(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``a @ q`` for float32 ``a`` [n, D] and ``q`` [D]; single-threaded for small n (see _SMALL_MATVEC)."""
    if len(a) <= _SMALL_MATVEC:
        return np.einsum("ij,j->i", a, q)
    return a @ q


def exact_topk_many(matrix: np.ndarray, queries: np.ndarray, k: int, check_cancel: CheckCancel = never_cancel) -> np.ndarray:
    """Exact top-k rows of ``matrix @ q`` for every row q of ``queries`` [nq, D], in one chunked pass.

    One float16 → float32 conversion and one matrix product per chunk serve all queries (a pass per
    query costs nq conversions of the whole column). Returns int64 [nq, k], best first.
    """
    n = matrix.shape[0]
    qt = _f32(queries).T  # [D, nq]
    nq = qt.shape[1]
    k = min(k, n)
    best_rows = np.zeros((nq, 0), np.int64)
    best_scores = np.zeros((nq, 0), np.float32)
    for start in range(0, n, _CHUNK):
        check_cancel()
        s = np.ascontiguousarray((_f32(matrix[start : start + _CHUNK]) @ qt).T)  # [nq, chunk]
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_rows = np.concatenate([best_rows, part + start], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(s, part, axis=1)], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_rows = np.take_along_axis(best_rows, keep, axis=1)
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1)


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
        self._rows: np.ndarray | None = None  # the clip column as a plain ndarray (no np.memmap indexing overhead)
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
        self._rows = np.asarray(self.embeddings)  # a view: no copy, but cheaper to index than the memmap
        if n <= self.exact_max or n < IVF_MIN_ROWS:
            self._dense = _f32(self.embeddings)
            self._ivf = None
        else:
            self._dense = None
            self._ivf, self.info = ensure_index(self.library, persist=False)
        self._count = n

    def search(self, q: np.ndarray, k: int, *, exact: bool = False, shortlist: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact inner products of the (approximately) top-k rows for query vector ``q``, best first.

        With ``shortlist`` in ANN mode, every row re-ranked on the way (rerank_pool(k) ≥ k of them):
        rows not returned then score (approximately: up to the index's recall) no more than the last one.
        """
        self._sync()
        q = _f32(q).reshape(-1)
        k = min(int(k), self.library.count)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self._dense is not None:
            return exact_topk(self._dense, q, k)
        if exact or self._ivf is None:
            return exact_topk(self.embeddings, q, k)
        kprime = rerank_pool(k, self.library.count)
        try:
            self._ivf.nprobe = self.info.nprobe if self.info else 16
            _, ids = self._ivf.search(q[None, :], kprime)
        except Exception as exc:  # faiss raises RuntimeError/AssertionError on an index it cannot use
            log.warning("search index of %s failed (%s); searching exactly from now on", self.library.path, exc)
            self._ivf, self.info = None, None
            return exact_topk(self.embeddings, q, k)
        # Ids are rows; one outside the committed rows can only come from a damaged index.
        rows = ids[0][(ids[0] >= 0) & (ids[0] < self.library.count)]
        scores = self.scores(rows, q)
        order = np.argsort(-scores, kind="stable")
        if not shortlist:
            order = order[:k]
        return rows[order].astype(np.int64), scores[order]

    def all_scores(self, q: np.ndarray) -> np.ndarray | None:
        """Inner products of every row with ``q`` in exact mode (None in ANN mode)."""
        self._sync()
        return None if self._dense is None else self._dense @ _f32(q).reshape(-1)

    def exact_scores(self, q: np.ndarray) -> np.ndarray:
        """Inner products of every row with ``q``, in either mode (a chunked pass over the stored column)."""
        self._sync()
        q = _f32(q).reshape(-1)
        if self._dense is not None:
            return self._dense @ q
        emb = self.embeddings
        return np.concatenate([_f32(emb[s : s + _CHUNK]) @ q for s in range(0, len(emb), _CHUNK)] or [np.zeros(0, np.float32)])

    def scores(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Exact inner products of the given rows with ``q``."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        q = _f32(q).reshape(-1)
        if self._dense is not None and self._count == self.library.count:
            return matvec(self._dense[rows], q)
        emb = self._rows if self._rows is not None and self._count == self.library.count else self.embeddings
        order = np.argsort(rows)  # ascending rows: the gather walks the file forwards
        out = np.empty(len(rows), np.float32)
        out[order] = matvec(_f32(emb[rows[order]]), q)
        return out


def rerank_pool(k: int, n: int) -> int:
    return min(n, max(RERANK_FACTOR * k, RERANK_MIN))


def _index_paths(library: Library) -> tuple[Path, Path]:
    d = library.path / INDEX_DIR
    return d / "clip.faiss", d / "clip.json"


def _choose_params(n: int, dim: int) -> tuple[int, int]:
    nlist = int(2 ** round(math.log2(max(64.0, 2 * math.sqrt(n)))))
    nlist = min(nlist, NLIST_MAX)
    m = dim // 8 if dim % 8 == 0 else dim // 4 if dim % 4 == 0 else dim // 2
    return nlist, max(1, m)


def build_index(library: Library, *, progress: Progress = no_progress,
                check_cancel: CheckCancel = never_cancel) -> tuple[Any, IndexInfo]:
    """Train an IVF-PQ index on the library's embeddings, add all rows and tune nprobe.

    ``progress`` (noisequery_core.work) counts rows added to the index, after training on a sample;
    ``check_cancel`` is called before training and between chunks of rows. The index is derived data:
    stopping loses nothing committed (searches stay exact or catch up, the next writer rebuilds).
    Raises LibraryError for a library with fewer than IVF_MIN_ROWS entries (too few to train).
    """
    faiss = _faiss()
    emb = library.column("clip")
    n, dim = emb.shape
    if n < IVF_MIN_ROWS:
        raise LibraryError(exact_note(n))
    nlist, m = _choose_params(n, dim)
    rng = np.random.default_rng(0)
    ntrain = min(n, max(40 * nlist, 20_000))
    sample = np.sort(rng.choice(n, size=ntrain, replace=False))
    xt = _f32(emb[sample])
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_ITERS
    index.pq.cp.niter = PQ_ITERS
    log.info("training IVF%d,PQ%d on %d of %d vectors", nlist, m, ntrain, n)
    progress(0, n, f"training the index on {ntrain} vectors")
    check_cancel()
    index.train(xt)
    _add_rows(index, emb, 0, n, progress, check_cancel)
    progress(n, n, "tuning the index")
    nprobe, recall = _tune_nprobe(index, emb, rng, check_cancel=check_cancel)
    info = IndexInfo("ivfpq", nlist, m, nprobe, n, n, library.features.clip.describe() if library.features.clip else "", recall)
    return index, info


def _add_rows(index: Any, emb: np.ndarray, start: int, stop: int, progress: Progress = no_progress,
              check_cancel: CheckCancel = never_cancel) -> None:
    for s in range(start, stop, _CHUNK):
        check_cancel()
        e = min(stop, s + _CHUNK)
        index.add_with_ids(_f32(emb[s:e]), np.arange(s, e, dtype=np.int64))
        progress(e - start, stop - start, "adding rows to the index")


def _tune_nprobe(index: Any, emb: np.ndarray, rng: np.random.Generator, nq: int = TUNE_QUERIES,
                 check_cancel: CheckCancel = never_cancel) -> tuple[int, float]:
    """Smallest nprobe whose recall@10 (after exact re-ranking) reaches RECALL_TARGET on held-out queries.

    The exact truth of all queries comes from one pass over the embeddings (exact_topk_many); a
    pass per query was most of a 1M build.
    """
    n, dim = emb.shape
    rows = rng.choice(n, size=min(nq, n), replace=False)
    q = _f32(emb[np.sort(rows)])
    q = q + rng.standard_normal(q.shape).astype(np.float32) * 0.5 / math.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = [set(t.tolist()) for t in exact_topk_many(emb, q, 10, check_cancel)]
    recall = 0.0
    nprobe = 1
    for nprobe in (4, 8, 16, 32, 64, 128, 256):
        if nprobe > index.nlist:
            break
        check_cancel()
        index.nprobe = nprobe
        _, ids = index.search(q, rerank_pool(10, n))
        hits = 0
        for i, qi in enumerate(q):
            cand = np.sort(ids[i][ids[i] >= 0])
            sc = matvec(_f32(emb[cand]), qi)
            top = cand[np.argsort(-sc)[:10]]
            hits += len(truth[i] & set(top.tolist()))
        recall = hits / (10 * len(q))
        if recall >= RECALL_TARGET:
            break
    return nprobe, recall


def exact_note(n: int) -> str:
    """Why a library of ``n`` entries has no approximate index."""
    return (
        f"{n} entries: searched exactly. An approximate (IVF) index needs at least {IVF_MIN_ROWS} entries to train, "
        "and exact search is fast at this size."
    )


def _rows_fingerprint(library: Library, ntotal: int) -> str:
    """Binds an index to the rows it covers: their seeds and a spread sample of their embeddings."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(library.seeds[:ntotal]).tobytes())
    sample = np.unique(np.linspace(0, max(ntotal - 1, 0), num=min(ntotal, 256)).astype(np.int64))
    h.update(np.ascontiguousarray(library.column("clip")[sample]).tobytes())
    return h.hexdigest()


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"clip.json field {key!r} is {str(v)[:40]!r}, not a whole number from {lo} to {hi}")
    return v


def _parse_info(meta: Any, library: Library) -> tuple[IndexInfo, dict[str, Any]]:
    """Validated IndexInfo and checks from clip.json; ValueError saying what does not fit this library."""
    if not isinstance(meta, dict):
        raise ValueError("clip.json does not hold a JSON object")
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"clip.json has format {str(meta.get('format'))[:20]!r} (this version writes {INDEX_FORMAT})")
    if meta.get("kind") != "ivfpq":
        raise ValueError(f"clip.json describes a {str(meta.get('kind'))[:40]!r} index, not ivfpq")
    ident = library.features.clip
    dim = ident.dim if ident else 0
    if meta.get("dim") != dim or meta.get("clip") != (ident.describe() if ident else ""):
        raise ValueError(f"the index is for {str(meta.get('clip'))[:80]!r} vectors of dimension {str(meta.get('dim'))[:12]}, "
                         f"the library holds {ident.describe() if ident else 'none'}")
    nlist = _int(meta, "nlist", 1, 1 << 20)
    recall = meta.get("recall_at_10")
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 <= recall <= 1:
        raise ValueError(f"clip.json field 'recall_at_10' is {str(recall)[:40]!r}")
    info = IndexInfo(
        kind="ivfpq",
        nlist=nlist,
        m=_int(meta, "m", 1, max(dim, 1)),
        nprobe=_int(meta, "nprobe", 1, nlist),
        ntotal=_int(meta, "ntotal", 1, library.count),
        trained_on=_int(meta, "trained_on", 1, 1 << 40),
        clip=str(meta["clip"]),
        recall_at_10=float(recall),
    )
    checks = {k: meta.get(k) for k in ("sha256", "rows_sha256")}
    for k, v in checks.items():
        if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            raise ValueError(f"clip.json field {k!r} is not a SHA-256 digest")
    return info, checks


def _read_index(library: Library) -> tuple[Any, IndexInfo] | str | None:
    """The saved index when it passes every check; a sentence saying why not; None when there is none."""
    faiss = _faiss()
    root = library.path
    fidx, finfo = _index_paths(library)
    try:
        if safefs.check(root, INDEX_DIR, "dir") is None:
            return None
        have = [safefs.check(root, f"{INDEX_DIR}/{p.name}", "file") is not None for p in (fidx, finfo)]
        if not any(have):
            return None
        if not all(have):
            return f"{fidx if not have[0] else finfo} is missing"
        meta = parse_json(safefs.read_bytes(root, f"{INDEX_DIR}/{finfo.name}", limit=_INFO_MAX_BYTES), finfo)
        info, checks = _parse_info(meta, library)
        dim = library.features.clip.dim if library.features.clip else 0
        # Bound the read by what an index of this shape can weigh (codes + ids + centroids), so a
        # huge foreign file is refused before it is read.
        limit = 2 * (info.ntotal * (info.m + 8) + (info.nlist + 256) * dim * 4) + (16 << 20)
        data = safefs.read_bytes(root, f"{INDEX_DIR}/{fidx.name}", limit=limit)
    except (LibraryError, ValueError) as exc:
        return str(exc)
    if hashlib.sha256(data).hexdigest() != checks["sha256"]:
        return f"{fidx} does not match the checksum recorded in {finfo.name} (damaged, or replaced)"
    if _rows_fingerprint(library, info.ntotal) != checks["rows_sha256"]:
        return f"{fidx} was built over other entries (another library's index, or the library's rows changed)"
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except Exception as exc:  # faiss reports a malformed file as RuntimeError with a C++ trace
        return f"faiss cannot read {fidx} ({str(exc).splitlines()[0][:160]})"
    if (
        getattr(index, "nlist", None) != info.nlist
        or index.d != dim
        or not index.is_trained
        or index.ntotal != info.ntotal
        or type(index).__name__ != "IndexIVFPQ"
    ):
        return f"{fidx} is not the trained IVF-PQ index its {finfo.name} describes"
    return index, info


def load_index(library: Library) -> tuple[Any, IndexInfo] | None:
    """The saved index and its description, or None when there is none or it cannot be used (logged)."""
    got = _read_index(library)
    if isinstance(got, str):
        log.warning("search index of %s ignored: %s. It is rebuilt (in memory now, on disk by the next write or "
                    "`python -m noisequery_core index --library …`).", library.path, got)
        return None
    return got


def check_index(library: Library) -> str | None:
    """A sentence for `verify` when the saved index is unusable, missing where needed, or behind; else None."""
    if not library.has_clip:
        return None
    got = _read_index(library)
    n = library.count
    if isinstance(got, str):
        return f"the search index cannot be used ({got}); searches rebuild it in memory and the next write saves a new one."
    if got is None:
        if n > EXACT_MAX:
            return f"no saved search index for {n} entries; run `python -m noisequery_core index --library …` to save one."
        return None
    if got[1].ntotal < n:
        return f"the search index covers {got[1].ntotal} of {n} entries; searches catch up in memory."
    return None


def save_index(library: Library, index: Any, info: IndexInfo) -> None:
    """Write clip.faiss, then clip.json with its checksum (atomic, fsynced, never through a link)."""
    faiss = _faiss()
    fidx, finfo = _index_paths(library)
    safefs.ensure_dir(library.path, INDEX_DIR)
    data = faiss.serialize_index(index).tobytes()
    meta = {
        **info.to_json(),
        "format": INDEX_FORMAT,
        "dim": int(index.d),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows_sha256": _rows_fingerprint(library, info.ntotal),
    }
    # clip.faiss first: a crash between the two leaves a checksum mismatch, which is rebuilt.
    atomic_write_bytes(fidx, data)
    atomic_write_bytes(finfo, json.dumps(meta, indent=2).encode())


def ensure_index(library: Library, *, persist: bool, progress: Progress = no_progress,
                 check_cancel: CheckCancel = never_cancel) -> tuple[Any, IndexInfo]:
    """The library's IVF-PQ index, brought up to date with its committed rows.

    Rows appended since the index was saved are added; an index trained on far fewer rows
    than the library now holds (< 1/4) is rebuilt. With ``persist`` the result is saved
    atomically (writers do this after committing; readers catch up in memory only).
    ``progress`` / ``check_cancel`` (noisequery_core.work): rows added, when there are any; a stop
    leaves the saved index as it was.
    """
    got = load_index(library)
    n = library.count
    if got is not None and got[1].trained_on * 4 >= n:
        index, info = got
        if info.ntotal < n:
            _add_rows(index, library.column("clip"), info.ntotal, n, progress, check_cancel)
            info = IndexInfo(**{**info.to_json(), "ntotal": n})
            if persist:
                save_index(library, index, info)
        return index, info
    index, info = build_index(library, progress=progress, check_cancel=check_cancel)
    if persist:
        save_index(library, index, info)
    return index, info


def maintain_index(library: Library, *, exact_max: int = EXACT_MAX, progress: Progress = no_progress,
                   check_cancel: CheckCancel = never_cancel) -> IndexInfo | None:
    """Bring the persisted index in step with the committed rows (call with the writer lock held)."""
    if not library.has_clip or library.count <= exact_max or library.count < IVF_MIN_ROWS:
        return None
    return ensure_index(library, persist=True, progress=progress, check_cancel=check_cancel)[1]
