"""Queries over a library: text, negative text, image example, colour targets, layout — combined.

Every term produces a raw value per entry (a cosine, a colour-mass fraction, a negative
distance). Raw values live on very different scales, so each term is standardised to a
z-score with the mean and standard deviation of that term over a fixed sample of the
library; the total is the weighted sum of z-scores. Weights are therefore "how many
standard deviations of this term are worth one of that term", whatever the term.

All CLIP terms are linear in the stored embedding, so together they fold into a single
query vector that the ANN index can search; colour terms are cheap column scans.

Each kind of term is a small class with one method, ``score(rows) -> raw values``, made from
its part of the Query by a builder function (search/terms.py). The Searcher only composes them:
it standardises every term on a sample of the library and adds them up by weight.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..checks import finite
from ..errors import QueryError
from ..library.manifest import MANIFEST_NAME
from ..library.storage import Library
from . import color
from .index import ClipSearcher, matvec
from .terms import ScanColumns, Term, clip_terms, colour_side_terms

log = logging.getLogger("noisequery")

SAMPLE_ROWS = 4096
_MAX_TOP_K = 10_000
# A term whose raw values spread less than this over the sample is constant: it is not standardised.
_MIN_SIGMA = 1e-6
# Top-k of an array at least this long is found through a threshold (top_indices): np.argpartition
# over a million values costs ~10 ms, a threshold pass ~0.3 ms.
_PREFILTER_MIN = 1 << 15
_PREFILTER_SAMPLE = 1 << 14  # values in the strided sample that sets the threshold
# Rows off the index's shortlist that a CLIP + colour query may score exactly (best colour first):
# ~2 ms at D = 512; enough for every row that could still matter on the test libraries, and a 100k
# benchmark library reaches the same top-10 recall with 40 (Searcher._ann_and_colour).
COMBINED_EXTRA_ROWS = 2048


class TextEncoder(Protocol):
    """What a query needs from a CLIP model (``clip.ClipEmbedder`` is one)."""

    identity: Any

    def encode_text(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class StatTarget:
    """Aim a low-level statistic at a value or keep it inside a range (names: color.STAT_NAMES)."""

    name: str
    target: float | None = None
    lo: float | None = None
    hi: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _finite_numbers(self, f"{self.name} ", ("target", "lo", "hi", "weight"))


@dataclass(frozen=True)
class RegionTarget:
    """A named region (color.REGION_NAMES) should have a colour and/or a lightness (0..1)."""

    region: str
    color: str | None = None
    lightness: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _finite_numbers(self, f"region {self.region} ", ("lightness", "weight"))


@dataclass(frozen=True)
class Query:
    """What to look for; every part is optional, parts combine by weight."""

    text: str = ""
    text_weight: float = 1.0
    negative_text: str = ""
    negative_weight: float = 0.5
    image_embedding: np.ndarray | None = None  # CLIP embedding of an example image
    image_weight: float = 1.0
    colors: tuple[tuple[str, float], ...] = ()  # (hex colour, weight): dominant colours
    stats: tuple[StatTarget, ...] = ()
    regions: tuple[RegionTarget, ...] = ()
    layout: np.ndarray | None = None  # uint8 [GRID, GRID, 3] layout of an example image
    layout_weight: float = 1.0
    palette: tuple[tuple[str, float], ...] = ()  # (hex colour, proportion): an example image's colours, wherever they are
    palette_weight: float = 1.0
    exclude_seeds: tuple[int, ...] = ()
    top_k: int = 10
    diversity: float = 0.0  # 0 = pure ranking; up to 1 = strongest MMR de-duplication

    def __post_init__(self) -> None:
        _finite_numbers(self, "query ", ("text_weight", "negative_weight", "image_weight", "layout_weight",
                                         "palette_weight", "diversity"))
        for hexcol, w in self.colors:
            finite(w, f"query colour {hexcol} weight", error=QueryError)
        for hexcol, share in self.palette:
            finite(share, f"query palette colour {hexcol} proportion", error=QueryError)
            if share <= 0:
                raise QueryError(f"query palette colour {hexcol} has proportion {share}; give proportions above 0.")

    @property
    def has_clip_terms(self) -> bool:
        return bool(self.text.strip() or self.negative_text.strip() or self.image_embedding is not None)

    @property
    def has_color_terms(self) -> bool:
        return bool(self.colors or self.stats or self.regions or self.layout is not None or self.palette)


def _finite_numbers(obj: Any, prefix: str, names: Sequence[str]) -> None:
    """Refuse NaN/inf in a query part: they pass every range check and turn scores into NaN (rows in file order)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            finite(value, f"{prefix}{name}", error=QueryError)


@dataclass
class TermScore:
    raw: float
    z: float
    weighted: float


@dataclass
class Hit:
    seed: int
    row: int
    score: float
    terms: dict[str, TermScore] = field(default_factory=dict)
    thumbnail: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "score": round(self.score, 5),
            "thumbnail": str(self.thumbnail) if self.thumbnail else None,
            "terms": {k: {"raw": round(v.raw, 5), "z": round(v.z, 4), "weighted": round(v.weighted, 4)} for k, v in self.terms.items()},
        }


# ---------------------------------------------------------------- composing terms


@dataclass(eq=False)
class _Scaled:
    """A term with the mean and spread of its raw values over the library sample (z = (raw − mu) / sigma).

    Its weighted z is ``factor · raw − shift``: scans add ``factor · raw`` per row and the shifts of
    all terms once, which ranks the same and saves two passes over the rows per term.
    """

    term: Term
    mu: float = 0.0
    sigma: float = 1.0

    @property
    def factor(self) -> float:
        return self.term.weight / self.sigma

    @property
    def shift(self) -> float:
        return self.term.weight * self.mu / self.sigma


def _scale(term: Term, mu: float, var: float) -> _Scaled:
    sigma = math.sqrt(var) if var > _MIN_SIGMA**2 else 1.0
    return _Scaled(term, mu, sigma)


def _scale_sample(term: Term, sample_raw: np.ndarray) -> _Scaled:
    raw = sample_raw.astype(np.float64)
    return _scale(term, float(raw.mean()), float(raw.var()))


def top_indices(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest ``values``, best first; ties go to the lower index, NaN last.

    For a long array the candidates are first cut by a threshold: the m-th largest of a strided
    sample is at most the m-th largest of all, so every row of the top m is at or above it, and
    one comparison pass leaves ~m · stride survivors for the exact selection. Same result as a
    selection over the whole array.
    """
    n = len(values)
    m = min(int(m), n)
    if m <= 0:
        return np.zeros(0, np.int64)
    idx: np.ndarray | None = None
    if n >= _PREFILTER_MIN and m * 64 <= n:
        stride = max(1, n // max(_PREFILTER_SAMPLE, 16 * m))
        sub = values[::stride]
        if len(sub) > m:
            thr = np.partition(sub, len(sub) - m)[len(sub) - m]
            if thr == thr:  # not NaN (a NaN threshold says nothing)
                got = np.flatnonzero(values >= thr)
                if len(got) >= m:
                    idx = got
    if idx is None:
        idx = np.arange(n, dtype=np.int64)
    vals = values[idx]
    if len(idx) > m:
        # The m-th largest value; rows above it all belong, rows equal to it fill up by index.
        cut = np.partition(vals, len(vals) - m)[len(vals) - m]
        if cut == cut:
            above = vals > cut
            ties = np.flatnonzero(vals == cut)[: m - int(above.sum())]
            keep = np.sort(np.concatenate([np.flatnonzero(above), ties]))
            idx, vals = idx[keep], vals[keep]
    order = np.argsort(-vals, kind="stable")[:m]  # NaN sorts last
    return idx[order].astype(np.int64, copy=False)


# ---------------------------------------------------------------- the searcher


class Searcher:
    """Runs queries against one library; cheap to keep around (caches columns and the index)."""

    def __init__(self, library: Library, *, embedder: TextEncoder | None = None, exact_max: int | None = None):
        self.library = library
        self.embedder = embedder
        self._clip: ClipSearcher | None = None
        self._exact_max = exact_max
        self._cols: ScanColumns | None = None
        self._sample: np.ndarray | None = None
        # (library count, mean [D], covariance [D, D]) of the sample's CLIP embeddings, float64
        self._moments: tuple[int, np.ndarray, np.ndarray] | None = None
        self._manifest_path = os.path.join(library.path, MANIFEST_NAME)
        self._manifest_seen: tuple[int, ...] | None = None

    def _refresh(self) -> None:
        """``library.refresh()`` when the manifest file changed since the last look.

        Re-reading and validating the manifest is a tenth of a text query; an ``lstat`` is not.
        Every commit replaces the manifest by a rename (a new file), so its inode, size or times
        change; anything the lstat cannot see (no file, a link) goes to ``refresh``, which says
        what is wrong.
        """
        try:
            st = os.lstat(self._manifest_path)
            seen: tuple[int, ...] | None = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        except OSError:
            seen = None
        if seen is None or seen != self._manifest_seen:
            self._manifest_seen = None
            self.library.refresh()
            self._manifest_seen = seen

    # -- caches, refreshed when the library grows
    def _columns(self) -> ScanColumns:
        lib = self.library
        if self._cols is None or (self._cols.count, self._cols.color_version) != (lib.count, lib.features.color_version):
            self._cols = ScanColumns(self.library)
            self._sample = None
        return self._cols

    def _sample_rows(self) -> np.ndarray:
        n = self.library.count
        if self._sample is None or (len(self._sample) < min(n, SAMPLE_ROWS)):
            if n <= SAMPLE_ROWS:
                self._sample = np.arange(n, dtype=np.int64)
            else:
                self._sample = np.sort(np.random.default_rng(0).choice(n, SAMPLE_ROWS, replace=False))
        return self._sample

    def _sample_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and covariance [D, D] (float64) of the sample rows' CLIP embeddings, cached until the library grows.

        A CLIP term's raw value is linear in the embedding, so its mean and variance over the sample
        are m·v and vᵀCv: a D × D product per term instead of a SAMPLE_ROWS × D one, and D² floats
        kept instead of the sample's embeddings (2 MiB against 8 at D = 512).
        """
        n = self.library.count
        if self._moments is None or self._moments[0] != n:
            emb = self.library.column("clip")
            rows = self._sample_rows()
            step = 512  # rows at a time: small temporaries
            parts = [np.asarray(emb[rows[s : s + step]], dtype=np.float64) for s in range(0, len(rows), step)]
            mean = sum(p.sum(axis=0) for p in parts) / len(rows)
            cov = np.zeros((emb.shape[1], emb.shape[1]), np.float64)
            for p in parts:
                p -= mean
                cov += p.T @ p
            cov /= len(rows)
            self._moments = (n, mean, cov)
        return self._moments[1], self._moments[2]

    def clip_searcher(self) -> ClipSearcher:
        if self._clip is None:
            kw = {} if self._exact_max is None else {"exact_max": self._exact_max}
            self._clip = ClipSearcher(self.library, **kw)
        return self._clip

    # -- public
    def encode_text(self, text: str) -> np.ndarray:
        lib_clip = self.library.features.clip
        if lib_clip is None:
            raise QueryError(
                f"Library {self.library.path} has no CLIP features (built with CLIP model 'none'), so it cannot "
                "answer text queries. Use colour queries, or rebuild/import it with a CLIP model."
            )
        if self.embedder is None:
            raise QueryError(f"A text query needs the library's CLIP model ({lib_clip.describe()}); none was loaded.")
        ident = self.embedder.identity
        if (ident.model, ident.pretrained, ident.dim) != (lib_clip.model, lib_clip.pretrained, lib_clip.dim):
            raise QueryError(
                f"The text encoder is CLIP {ident.describe()} but library {self.library.path} was embedded with "
                f"{lib_clip.describe()}; their vectors are not comparable. Load the library's CLIP model."
            )
        return self.embedder.encode_text([text])[0]

    def search(self, query: Query, *, exact: bool = False) -> list[Hit]:
        """Top hits for ``query``. Raises QueryError for malformed or unanswerable queries.

        ``exact=True`` scores every row exactly (no approximate index, no candidate pruning): slow on
        a large library; the reference the fast path is checked against.
        """
        lib = self.library
        self._refresh()
        n = lib.count
        if n == 0:
            raise QueryError(
                f"Library {lib.path} is empty: build it (BuildNoiseLibrary) or import images first."
            )
        if not isinstance(query.top_k, (int, np.integer)) or query.top_k < 1:
            raise QueryError(f"top_k must be at least 1 (got {query.top_k!r}).")
        if query.top_k > _MAX_TOP_K:
            raise QueryError(f"top_k {query.top_k} is larger than the maximum {_MAX_TOP_K}. To get every entry with its "
                             "statistics and colours, use `python -m noisequery_core export --library L` (csv, jsonl or "
                             "parquet) and sort it yourself.")
        if not 0.0 <= query.diversity <= 1.0:
            raise QueryError(f"diversity must be between 0 and 1 (got {query.diversity}).")
        if not (query.has_clip_terms or query.has_color_terms):
            raise QueryError("The query is empty: give a text, an example image, a colour or a statistic target.")

        clip_vec, clip_offset, clip_scaled = self._clip_part(query)
        sample = self._sample_rows()
        color_scaled = [_scale_sample(t, t.score(sample)) for t in self._color_terms(query)]
        color_shift = sum(t.shift for t in color_scaled)  # subtracted once, after the scans

        exclude = lib.rows_of(list(query.exclude_seeds)) if query.exclude_seeds else np.zeros(0, np.int64)
        exclude = np.unique(exclude[exclude >= 0])
        k = min(query.top_k, n - len(exclude))
        if k <= 0:
            return []
        # Candidates ranked before MMR / the cut to k; as many more as rows are excluded, so that
        # enough remain once they are dropped.
        wide = max(k * (5 if query.diversity > 0 else 1), k) + len(exclude)

        every: np.ndarray | None = None
        if clip_vec is not None:
            cs = self.clip_searcher()
            every = cs.all_scores(clip_vec)  # exact mode: every row is scored anyway
            if every is None and exact:
                every = cs.exact_scores(clip_vec)
        if clip_vec is not None and every is None:
            # ANN mode: only candidates are scored exactly.
            if color_scaled:
                cand, total = self._ann_and_colour(cs, clip_vec, clip_offset, self._color_total(color_scaled), wide, exclude)
            else:  # the ANN already returns exact re-ranked scores
                cand, clip_w = cs.search(clip_vec, wide)
                if len(exclude):
                    keep = ~np.isin(cand, exclude)
                    cand, clip_w = cand[keep], clip_w[keep]
                total = clip_w - np.float32(clip_offset)
            top = top_indices(total, wide)
            pool_rows, pool_total = cand[top], total[top]
        else:
            # Every row is a candidate: colour-only queries, exact CLIP mode, or exact=True.
            if every is not None:
                every -= np.float32(clip_offset)
            if color_scaled:
                total = self._color_total(color_scaled)
                if every is not None:
                    total += every
            else:
                assert every is not None  # the query has a CLIP or a colour term (checked above)
                total = every
            if len(exclude):
                total[exclude] = -np.inf
            pool_rows = top_indices(total, min(wide, n - len(exclude)))
            pool_total = total[pool_rows]
        pool_total = pool_total - np.float32(color_shift)

        if query.diversity > 0:
            chosen = self._mmr(pool_rows, pool_total, k, query.diversity)
        else:
            chosen = np.arange(min(k, len(pool_rows)))
        rows, scores = pool_rows[chosen], pool_total[chosen]

        scaled = [*clip_scaled, *color_scaled]
        raws = [t.term.score(rows) for t in scaled]  # a handful of rows: cheap, and no per-row array kept
        seeds = lib.seeds
        hits: list[Hit] = []
        for j in range(len(rows)):
            terms: dict[str, TermScore] = {}
            for t, r in zip(scaled, raws):
                raw = float(r[j])
                z = (raw - t.mu) / t.sigma
                terms[t.term.name] = TermScore(raw, z, t.term.weight * z)
            seed = int(seeds[rows[j]])
            hits.append(Hit(seed=seed, row=int(rows[j]), score=float(scores[j]), terms=terms, thumbnail=lib.thumbnail_path(seed)))
        return hits

    # -- composing the terms
    def _clip_part(self, query: Query) -> tuple[np.ndarray | None, float, list[_Scaled]]:
        """All CLIP terms folded into one vector: Σ wᵢ(vᵢ·x − μᵢ)/σᵢ = (Σ wᵢvᵢ/σᵢ)·x − offset."""
        if not query.has_clip_terms:
            return None, 0.0, []
        lib = self.library
        if lib.features.clip is None:
            raise QueryError(
                f"Library {lib.path} has no CLIP features (built with CLIP model 'none'), so it cannot answer "
                "text or image-example queries. Use colour queries, or rebuild/import it with a CLIP model."
            )
        terms = clip_terms(query, self.encode_text, lib.features.clip.dim, self.clip_searcher())
        mean, cov = self._sample_moments()
        combined = np.zeros(lib.features.clip.dim, np.float32)
        offset = 0.0
        scaled: list[_Scaled] = []
        for t in terms:
            v = np.asarray(t.vector, np.float64)
            st = _scale(t, float(mean @ v), float(v @ matvec(cov, v)))
            combined += np.float32(st.factor) * t.vector
            offset += st.shift
            scaled.append(st)
        return combined, offset, scaled

    def _color_terms(self, query: Query) -> list[Term]:
        """The query's colour-side terms, in order: colours, statistics, regions, layout, palette."""
        if not query.has_color_terms:
            return []
        return colour_side_terms(self._columns(), query)

    def _ann_and_colour(self, cs: ClipSearcher, clip_vec: np.ndarray, clip_offset: float, ctot: np.ndarray, wide: int,
                        exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate rows and their exact totals for a CLIP + colour query in ANN mode.

        Candidates are the index's whole shortlist (≥ RERANK_MIN rows, CLIP scored exactly while
        re-ranking) and the best rows by colour that could still beat it. The shortlist's top ``want``
        are the library's top ``want`` by CLIP up to the index's recall, so a row off the shortlist
        scores at most the ``want``-th, ``floor`` (not the shortlist's last: that one only closes the
        lists the index probed); every row's colour total ``ctot`` is known from the scan. A row off
        the shortlist can only enter the top ``wide`` when ``ctot + floor − offset`` beats the
        ``wide``-th best total so far: those are scored exactly, best colour first, up to
        max(4 · wide, COMBINED_EXTRA_ROWS) of them. When none is left within that budget the result is
        the top-k of scoring every row (Searcher.search(exact=True)); otherwise rows that are good on
        both sides but best on neither can be missed — bench_query.py measures the top-10 against
        exact=True (0.99 at 100k, where scoring every row the bound admits would cost ~3× the query).
        """
        want = max(wide, 50)
        shortlist, clip_w = cs.search(clip_vec, want, shortlist=True)
        offset = np.float32(clip_offset)
        if len(exclude):
            keep = ~np.isin(shortlist, exclude)
            shortlist, clip_w = shortlist[keep], clip_w[keep]
            ctot[exclude] = -np.inf  # never a candidate
        floor = float(clip_w[min(want, len(clip_w)) - 1]) - float(offset) if len(clip_w) else np.inf  # no bound without one
        cand_parts = [shortlist]
        total_parts = [clip_w - offset + ctot[shortlist]]
        ctot[shortlist] = -np.inf  # scored: out of the running below
        budget = max(4 * wide, COMBINED_EXTRA_ROWS)
        while budget > 0:
            totals = np.concatenate(total_parts)
            kth = np.partition(totals, len(totals) - wide)[len(totals) - wide] if len(totals) >= wide else -np.inf
            need = np.flatnonzero(ctot > kth - floor)  # bound ctot + floor above the current wide-th best
            if len(need) == 0:
                break
            if len(need) > budget:
                need = need[top_indices(ctot[need], budget)]
            budget -= len(need)
            cand_parts.append(need)
            total_parts.append(cs.scores(need, clip_vec) - offset + ctot[need])
            ctot[need] = -np.inf
        return np.concatenate(cand_parts), np.concatenate(total_parts)

    def _color_total(self, terms: list[_Scaled]) -> np.ndarray:
        """float32 [N]: Σ factor · raw over the colour-side terms for every row (their shifts left out)."""
        total = np.zeros(self.library.count, np.float32)
        for t in terms:
            raw = t.term.score(None)
            raw *= np.float32(t.factor)  # score() returns a fresh array
            total += raw
        return total

    def _mmr(self, rows: np.ndarray, rel: np.ndarray, k: int, diversity: float) -> np.ndarray:
        """Maximal marginal relevance over the candidate pool ``rows`` (relevance ``rel``); indices into the pool."""
        lib = self.library
        order = np.argsort(rows)
        if lib.features.clip is not None:
            feats = np.empty((len(rows), lib.features.clip.dim), np.float32)
            feats[order] = np.asarray(lib.column("clip")[rows[order]], dtype=np.float32)
        else:
            feats = np.empty((len(rows), color.GRID * color.GRID * 3), np.float32)
            feats[order] = color.layout_to_lab(lib.column("layout")[rows[order]]).reshape(len(rows), -1)
            feats -= feats.mean(axis=1, keepdims=True)
            feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-6)
        rel = (rel - rel.min()) / max(float(rel.max() - rel.min()), 1e-6)
        lam = 1.0 - diversity
        chosen: list[int] = [0]
        max_sim = feats @ feats[0]
        while len(chosen) < min(k, len(rows)):
            mmr = lam * rel - (1 - lam) * max_sim
            mmr[chosen] = -np.inf
            j = int(np.argmax(mmr))
            chosen.append(j)
            max_sim = np.maximum(max_sim, feats @ feats[j])
        return np.asarray(chosen)


def search(library: Library, query: Query, embedder: TextEncoder | None = None) -> list[Hit]:
    """One-shot search (builds a Searcher; keep a Searcher for repeated queries)."""
    return Searcher(library, embedder=embedder).search(query)


def parse_stat_arg(name: str, text: str, weight: float = 1.0) -> StatTarget:
    """'0.7' (target) or '0.6:0.9' / ':0.3' / '0.5:' (range) → StatTarget. Raises QueryError."""
    s = str(text).strip()
    try:
        if ":" in s:
            lo_s, hi_s = s.split(":", 1)
            return StatTarget(name, lo=float(lo_s) if lo_s else None, hi=float(hi_s) if hi_s else None, weight=weight)
        return StatTarget(name, target=float(s), weight=weight)
    except ValueError:
        raise QueryError(f"{name} {text!r} is not a number or a range like 0.6:0.9.") from None


def format_report(hits: Sequence[Hit]) -> str:
    """Human-readable ranking with per-term breakdown."""
    lines = []
    for i, h in enumerate(hits):
        parts = ", ".join(f"{k}: {v.raw:.4g} (z {v.z:+.2f})" for k, v in h.terms.items())
        lines.append(f"#{i} seed {h.seed}  score {h.score:+.3f}  [{parts}]")
    return "\n".join(lines)
