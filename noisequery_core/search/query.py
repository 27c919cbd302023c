"""Queries over a library: text, negative text, image example, colour targets, layout — combined.

Every term produces a raw value per entry (a cosine, a colour-mass fraction, a negative
distance). Raw values live on very different scales, so each term is standardised to a
z-score with the mean and standard deviation of that term over a fixed sample of the
library; the total is the weighted sum of z-scores. Weights are therefore "how many
standard deviations of this term are worth one of that term", whatever the term.

All CLIP terms are linear in the stored embedding, so together they fold into a single
query vector that the ANN index can search; colour terms are cheap column scans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..checks import finite
from ..errors import QueryError
from ..library.storage import Library
from . import color
from .index import ClipSearcher

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


# ---------------------------------------------------------------- column caches


class _Columns:
    """Column-major float copies of the colour columns (fast per-feature scans)."""

    def __init__(self, library: Library):
        self.count = library.count
        self.stats = np.ascontiguousarray(np.asarray(library.column("stats"), dtype=np.float32).T)  # [S, N]
        # float32 so a colour query is a few contiguous multiply-adds per active bin (the
        # histogram is the only colour feature scanned in full: 256 B per entry in RAM).
        self.hist = np.ascontiguousarray(np.asarray(library.column("hist"), dtype=np.float32).T)  # [B, N]
        self.regions = np.ascontiguousarray(np.asarray(library.column("regions")).transpose(1, 2, 0))  # fp16 [R,3,N]


@dataclass
class _Term:
    name: str
    weight: float
    raw: Callable[[np.ndarray | None], np.ndarray]  # rows (None = all) -> raw values
    mu: float = 0.0
    sigma: float = 1.0


class Searcher:
    """Runs queries against one library; cheap to keep around (caches columns and the index)."""

    def __init__(self, library: Library, *, embedder: TextEncoder | None = None, exact_max: int | None = None):
        self.library = library
        self.embedder = embedder
        self._clip: ClipSearcher | None = None
        self._exact_max = exact_max
        self._cols: _Columns | None = None
        self._sample: np.ndarray | None = None
        self._sample_emb: tuple[int, np.ndarray] | None = None

    # -- caches, refreshed when the library grows
    def _columns(self) -> _Columns:
        if self._cols is None or self._cols.count != self.library.count:
            self._cols = _Columns(self.library)
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
            raise QueryError(f"top_k {query.top_k} is larger than the maximum {_MAX_TOP_K}.")
        if not 0.0 <= query.diversity <= 1.0:
            raise QueryError(f"diversity must be between 0 and 1 (got {query.diversity}).")
        if not (query.has_clip_terms or query.has_color_terms):
            raise QueryError("The query is empty: give a text, an example image, a colour or a statistic target.")

        clip_vec, clip_offset, clip_terms = self._clip_terms(query)
        color_terms = self._color_terms(query)
        sample = self._sample_rows()
        for t in color_terms:
            v = t.raw(sample)
            t.mu, t.sigma = float(v.mean()), float(v.std()) or 1.0

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
                if color_terms:  # ANN candidates ∪ best by colour, so neither side is cut off
                    ann, _ = cs.search(clip_vec, max(pool * 4, 50))
                    ctot = self._color_total(color_terms, None)
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
        color_raw = {t.name: t.raw(None if every_row else cand) for t in color_terms}
        for t in color_terms:
            total += t.weight * (color_raw[t.name] - t.mu) / t.sigma

        pool = min(pool, len(cand))
        top = np.argpartition(-total, pool - 1)[:pool] if pool < len(cand) else np.arange(len(cand))
        top = top[np.argsort(-total[top], kind="stable")]
        if query.diversity > 0:
            top = self._mmr(cand, total, top, k, query.diversity)
        top = top[:k]

        rows = cand[top]
        raws = {t.name: t.raw(rows) for t in clip_terms}
        raws.update({t.name: color_raw[t.name][top] for t in color_terms})
        seeds = lib.seeds
        hits: list[Hit] = []
        for j, i in enumerate(top):
            terms: dict[str, TermScore] = {}
            for t in (*clip_terms, *color_terms):
                raw = float(raws[t.name][j])
                z = (raw - t.mu) / t.sigma
                terms[t.name] = TermScore(raw, z, t.weight * z)
            seed = int(seeds[rows[j]])
            hits.append(Hit(seed=seed, row=int(rows[j]), score=float(total[i]), terms=terms, thumbnail=lib.thumbnail_path(seed)))
        return hits

    # -- term construction
    def _clip_terms(self, query: Query) -> tuple[np.ndarray | None, float, list[_Term]]:
        """All CLIP terms folded into one vector: Σ wᵢ(vᵢ·x − μᵢ)/σᵢ = (Σ wᵢvᵢ/σᵢ)·x − offset."""
        if not query.has_clip_terms:
            return None, 0.0, []
        lib = self.library
        if lib.features.clip is None:
            raise QueryError(
                f"Library {lib.path} has no CLIP features (built with CLIP model 'none'), so it cannot answer "
                "text or image-example queries. Use colour queries, or rebuild/import it with a CLIP model."
            )
        vecs: list[tuple[str, np.ndarray, float]] = []
        if query.text.strip():
            vecs.append(("text", self.encode_text(query.text), query.text_weight))
        if query.negative_text.strip():
            vecs.append(("negative_text", self.encode_text(query.negative_text), -abs(query.negative_weight)))
        if query.image_embedding is not None:
            e = np.asarray(query.image_embedding, dtype=np.float32).reshape(-1)
            if e.shape[0] != lib.features.clip.dim:
                raise QueryError(
                    f"Example-image embedding has {e.shape[0]} dimensions, the library's CLIP has {lib.features.clip.dim}."
                )
            vecs.append(("image", e / max(float(np.linalg.norm(e)), 1e-12), query.image_weight))
        emb_sample = self._sample_embeddings()
        searcher = self.clip_searcher()
        terms: list[_Term] = []
        combined = np.zeros(lib.features.clip.dim, np.float32)
        offset = 0.0
        for name, v, w in vecs:
            s = emb_sample @ v
            mu, sigma = float(s.mean()), float(s.std()) or 1.0
            combined += (w / sigma) * v
            offset += w * mu / sigma

            def raw(rows: np.ndarray | None, v: np.ndarray = v) -> np.ndarray:
                assert rows is not None
                return searcher.scores(rows, v)

            terms.append(_Term(name, w, raw, mu, sigma))
        return combined, offset, terms

    def _color_terms(self, query: Query) -> list[_Term]:
        terms: list[_Term] = []
        if not query.has_color_terms:
            return terms
        cols = self._columns()

        def pick(a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
            return a if rows is None else a[..., rows]

        for hexcol, w in query.colors:
            kern = color.color_kernel(color.parse_hex_color(hexcol))
            active = np.nonzero(kern > 1e-2)[0]  # the rest holds a few % of the kernel's mass

            def raw_color(rows: np.ndarray | None, kern: np.ndarray = kern, active: np.ndarray = active) -> np.ndarray:
                out = np.zeros(self._nrows(rows), np.float32)
                for b in active:
                    out += kern[b] * pick(cols.hist[b], rows)
                return out

            terms.append(_Term(f"color {hexcol}", float(w), raw_color))
        for st in query.stats:
            if st.name not in color.STAT_INDEX:
                raise QueryError(f"Unknown statistic {st.name!r}; known: {', '.join(color.STAT_NAMES)}.")
            spec = color.STATS[color.STAT_INDEX[st.name]]
            if st.target is None and st.lo is None and st.hi is None:
                raise QueryError(f"Statistic {st.name!r} needs a target value or a range.")
            for label, val in (("target", st.target), ("lo", st.lo), ("hi", st.hi)):
                if val is not None and not (spec.lo - 1e-9 <= float(val) <= spec.hi + 1e-9):
                    raise QueryError(f"{st.name} {label} {val} is outside its range {spec.lo}..{spec.hi}.")
            if st.lo is not None and st.hi is not None and st.lo > st.hi:
                raise QueryError(f"{st.name}: range low {st.lo} is above high {st.hi}.")
            col = cols.stats[color.STAT_INDEX[st.name]]

            def raw_stat(rows: np.ndarray | None, col: np.ndarray = col, st: StatTarget = st) -> np.ndarray:
                x = pick(col, rows)
                if st.target is not None:
                    return -np.abs(x - np.float32(st.target))
                d = np.zeros_like(x)
                if st.lo is not None:
                    d += np.maximum(np.float32(st.lo) - x, 0)
                if st.hi is not None:
                    d += np.maximum(x - np.float32(st.hi), 0)
                return -d

            label = f"{st.name}={st.target}" if st.target is not None else f"{st.name} in [{st.lo},{st.hi}]"
            terms.append(_Term(label, float(st.weight), raw_stat))
        for rt in query.regions:
            if rt.region not in color.REGION_NAMES:
                raise QueryError(f"Unknown region {rt.region!r}; known: {', '.join(color.REGION_NAMES)}.")
            if rt.color is None and rt.lightness is None:
                raise QueryError(f"Region {rt.region!r} needs a colour or a lightness.")
            if rt.lightness is not None and not 0.0 <= rt.lightness <= 1.0:
                raise QueryError(f"Lightness {rt.lightness} for region {rt.region!r} must be between 0 and 1.")
            r = color.REGION_NAMES.index(rt.region)
            target_lab = color.srgb_to_lab(color.parse_hex_color(rt.color)) if rt.color is not None else None

            def raw_region(rows: np.ndarray | None, r: int = r, lab: np.ndarray | None = target_lab, rt: RegionTarget = rt) -> np.ndarray:
                if lab is not None:
                    d2 = sum((pick(cols.regions[r, c], rows).astype(np.float32) - lab[c]) ** 2 for c in range(3))
                    return -np.sqrt(d2)
                assert rt.lightness is not None
                return -np.abs(pick(cols.regions[r, 0], rows).astype(np.float32) - 100.0 * rt.lightness)

            what = rt.color if rt.color is not None else f"L={rt.lightness}"
            terms.append(_Term(f"{rt.region} {what}", float(rt.weight), raw_region))
        if query.layout is not None:
            target = color.layout_to_lab(np.asarray(query.layout)).reshape(-1, 3)
            if target.shape != (color.GRID * color.GRID, 3):
                raise QueryError(f"Layout must be a {color.GRID}×{color.GRID}×3 grid, got {np.asarray(query.layout).shape}.")
            layout_col = self.library.column("layout")

            def raw_layout(rows: np.ndarray | None, target: np.ndarray = target) -> np.ndarray:
                idx = np.arange(self.library.count) if rows is None else np.asarray(rows)
                out = np.empty(len(idx), np.float32)
                for s in range(0, len(idx), 16384):
                    part = idx[s : s + 16384]
                    lab = color.layout_to_lab(layout_col[part]).reshape(len(part), -1, 3)
                    out[s : s + len(part)] = -np.sqrt(((lab - target) ** 2).sum(-1)).mean(-1)
                return out

            terms.append(_Term("layout", float(query.layout_weight), raw_layout))
        return terms

    def _nrows(self, rows: np.ndarray | None) -> int:
        return self.library.count if rows is None else len(rows)

    def _color_total(self, terms: list[_Term], rows: np.ndarray | None) -> np.ndarray:
        total = np.zeros(self._nrows(rows), np.float32)
        for t in terms:
            total += t.weight * (t.raw(rows) - t.mu) / t.sigma
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
