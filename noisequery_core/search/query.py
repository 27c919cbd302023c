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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..checks import finite
from ..errors import QueryError
from ..library.storage import Library
from . import color
from .index import ClipSearcher
from .terms import ScanColumns, Term, clip_terms, color_terms, layout_term, region_term, stat_term

log = logging.getLogger("noisequery")

SAMPLE_ROWS = 4096
_MAX_TOP_K = 10_000


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
    exclude_seeds: tuple[int, ...] = ()
    top_k: int = 10
    diversity: float = 0.0  # 0 = pure ranking; up to 1 = strongest MMR de-duplication

    def __post_init__(self) -> None:
        _finite_numbers(self, "query ", ("text_weight", "negative_weight", "image_weight", "layout_weight", "diversity"))
        for hexcol, w in self.colors:
            finite(w, f"query colour {hexcol} weight", error=QueryError)

    @property
    def has_clip_terms(self) -> bool:
        return bool(self.text.strip() or self.negative_text.strip() or self.image_embedding is not None)

    @property
    def has_color_terms(self) -> bool:
        return bool(self.colors or self.stats or self.regions or self.layout is not None)


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
    """A term with the mean and spread of its raw values over the library sample (z = (raw − mu) / sigma)."""

    term: Term
    mu: float = 0.0
    sigma: float = 1.0

    def weighted(self, raw: np.ndarray) -> np.ndarray:
        return self.term.weight * (raw - self.mu) / self.sigma


def _scale(term: Term, sample_raw: np.ndarray) -> _Scaled:
    return _Scaled(term, float(sample_raw.mean()), float(sample_raw.std()) or 1.0)


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
        self._sample_emb: tuple[int, np.ndarray] | None = None

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

    def _sample_embeddings(self) -> np.ndarray:
        """float32 CLIP embeddings of the sample rows (cached until the library grows)."""
        n = self.library.count
        if self._sample_emb is None or self._sample_emb[0] != n:
            rows = self._sample_rows()
            self._sample_emb = (n, np.asarray(self.library.column("clip")[rows], dtype=np.float32))
        return self._sample_emb[1]

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

    def search(self, query: Query) -> list[Hit]:
        """Top hits for ``query``. Raises QueryError for malformed or unanswerable queries."""
        lib = self.library
        lib.refresh()
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
        color_scaled = [_scale(t, t.score(sample)) for t in self._color_terms(query)]

        exclude = lib.rows_of(list(query.exclude_seeds)) if query.exclude_seeds else np.zeros(0, np.int64)
        exclude = exclude[exclude >= 0]
        k = min(query.top_k, n - len(np.unique(exclude)))
        if k <= 0:
            return []
        pool = max(k * (5 if query.diversity > 0 else 1), k) + len(exclude)

        # Candidate rows: everything for small libraries / colour-only; otherwise ANN ∪ colour scan.
        clip_w: np.ndarray | None = None
        if clip_vec is not None:
            cs = self.clip_searcher()
            every = cs.all_scores(clip_vec)
            if every is not None:  # exact mode: every row is a candidate
                cand, clip_w = np.arange(n, dtype=np.int64), every
            else:
                if color_scaled:  # ANN candidates ∪ best by colour, so neither side is cut off
                    ann, _ = cs.search(clip_vec, max(pool * 4, 50))
                    ctot = self._color_total(color_scaled, None)
                    m = min(len(ctot), max(pool * 4, 50))
                    cand = np.union1d(ann, np.argpartition(-ctot, m - 1)[:m])
                    clip_w = cs.scores(cand, clip_vec)
                else:  # the ANN already returns exact re-ranked scores
                    cand, clip_w = cs.search(clip_vec, pool)
        else:
            cand = np.arange(n, dtype=np.int64)
        if len(exclude):
            keep = ~np.isin(cand, exclude)
            cand = cand[keep]
            if clip_w is not None:
                clip_w = clip_w[keep]

        total = np.zeros(len(cand), np.float32)
        if clip_w is not None:
            total += clip_w - clip_offset
        every_row = len(cand) == n  # then terms scan their columns directly instead of gathering
        color_raw = [t.term.score(None if every_row else cand) for t in color_scaled]
        for t, values in zip(color_scaled, color_raw):
            total += t.weighted(values)

        pool = min(pool, len(cand))
        top = np.argpartition(-total, pool - 1)[:pool] if pool < len(cand) else np.arange(len(cand))
        top = top[np.argsort(-total[top], kind="stable")]
        if query.diversity > 0:
            top = self._mmr(cand, total, top, k, query.diversity)
        top = top[:k]

        rows = cand[top]
        scaled = [*clip_scaled, *color_scaled]
        raws = [t.term.score(rows) for t in clip_scaled] + [values[top] for values in color_raw]
        seeds = lib.seeds
        hits: list[Hit] = []
        for j, i in enumerate(top):
            terms: dict[str, TermScore] = {}
            for t, r in zip(scaled, raws):
                raw = float(r[j])
                z = (raw - t.mu) / t.sigma
                terms[t.term.name] = TermScore(raw, z, t.term.weight * z)
            seed = int(seeds[rows[j]])
            hits.append(Hit(seed=seed, row=int(rows[j]), score=float(total[i]), terms=terms, thumbnail=lib.thumbnail_path(seed)))
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
        emb_sample = self._sample_embeddings()  # cached: the sample's statistics need no gather per query
        combined = np.zeros(lib.features.clip.dim, np.float32)
        offset = 0.0
        scaled: list[_Scaled] = []
        for t in terms:
            st = _scale(t, emb_sample @ t.vector)
            combined += (t.weight / st.sigma) * t.vector
            offset += t.weight * st.mu / st.sigma
            scaled.append(st)
        return combined, offset, scaled

    def _color_terms(self, query: Query) -> list[Term]:
        """The query's colour-side terms, in order: colours, statistics, regions, layout."""
        if not query.has_color_terms:
            return []
        cols = self._columns()
        terms: list[Term] = [*color_terms(cols, query.colors)]
        terms += [stat_term(cols, st) for st in query.stats]
        terms += [region_term(cols, rt) for rt in query.regions]
        if query.layout is not None:
            terms.append(layout_term(self.library, query.layout, query.layout_weight))
        return terms

    def _color_total(self, terms: list[_Scaled], rows: np.ndarray | None) -> np.ndarray:
        total = np.zeros(self.library.count if rows is None else len(rows), np.float32)
        for t in terms:
            total += t.weighted(t.term.score(rows))
        return total

    def _mmr(self, cand: np.ndarray, total: np.ndarray, top: np.ndarray, k: int, diversity: float) -> np.ndarray:
        """Maximal marginal relevance over the candidate pool ``top`` (indices into cand)."""
        lib = self.library
        rows = cand[top]
        order = np.argsort(rows)
        if lib.features.clip is not None:
            feats = np.empty((len(rows), lib.features.clip.dim), np.float32)
            feats[order] = np.asarray(lib.column("clip")[rows[order]], dtype=np.float32)
        else:
            feats = np.empty((len(rows), color.GRID * color.GRID * 3), np.float32)
            feats[order] = color.layout_to_lab(lib.column("layout")[rows[order]]).reshape(len(rows), -1)
            feats -= feats.mean(axis=1, keepdims=True)
            feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-6)
        rel = total[top]
        rel = (rel - rel.min()) / max(float(rel.max() - rel.min()), 1e-6)
        lam = 1.0 - diversity
        chosen: list[int] = [0]
        max_sim = feats @ feats[0]
        while len(chosen) < min(k, len(top)):
            mmr = lam * rel - (1 - lam) * max_sim
            mmr[chosen] = -np.inf
            j = int(np.argmax(mmr))
            chosen.append(j)
            max_sim = np.maximum(max_sim, feats @ feats[j])
        return top[np.asarray(chosen)]


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
