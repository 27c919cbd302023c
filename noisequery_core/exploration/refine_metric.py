"""What a refine walk maximises, computed on its renders: query terms, CLIP score, an aesthetic head; and its curve.

The colour-side terms are the library's own (search/terms.py: colour share, colour mix, statistic targets and
ranges, region colour/lightness, layout), built from the same Query a NoiseQueryColor node outputs, over the colour
columns of the renders (search/color.analyse) instead of a library's. CLIP score and aesthetic score are
exploration/rank.py's, on the renders' CLIP image embeddings. Each becomes one named part for refine.Metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image, ImageDraw

from ..library.manifest import FeatureSet
from ..library.storage import Library
from ..search import color
from ..search.query import Query
from ..search.terms import ScanColumns, Term, colour_side_terms
from .rank import clip_scores, embed_images
from .refine import Metric, RefineError, ScoreParts


class RenderRows:
    """The colour columns of a batch of renders, read by the term builders the way they read a library's rows."""

    def __init__(self, images: Sequence[Image.Image | np.ndarray]):
        self._columns = color.analyse(list(images)).columns()
        self.count = len(images)
        self.path = "<refine renders>"
        self.features = FeatureSet(clip=None, color_version=color.COLOR_VERSION, thumbnail_size=0)

    def column(self, name: str) -> np.ndarray:
        return self._columns[name]


def query_terms(query: Query, images: Sequence[Image.Image | np.ndarray]) -> list[Term]:
    """The query's colour-side terms (search/terms.colour_side_terms, as a Noise Query builds them), scoring
    ``images`` as rows 0..n-1.

    Raises QueryError for a malformed part (as a Noise Query does).
    """
    rows = cast(Library, RenderRows(images))  # duck-typed: count, features, column(name)
    return colour_side_terms(ScanColumns(rows), query)


@dataclass(frozen=True)
class MetricSpec:
    """The parts to score by. Weights of 0 leave a part out.

    ``embedder``: an object with ``preprocess``/``encode_images``/``encode_text`` (search/clip.ClipEmbedder), needed
    for ``text`` and ``aesthetic``; ``aesthetic``: a callable embeddings [N, D] -> scores [N] (rank.AestheticHead).
    """

    query: Query | None = None
    query_weight: float = 1.0
    text: str = ""
    clip_weight: float = 0.0
    aesthetic: Any = None
    aesthetic_weight: float = 0.0
    embedder: Any = None


def build_metric(spec: MetricSpec) -> tuple[ScoreParts, Metric]:
    """The scorer and the Metric for ``spec``.

    Raises RefineError when a part cannot be scored: a CLIP weight with an empty text, an aesthetic head or CLIP
    text without an embedder, a query with no colour-side terms, or nothing at all to score by.
    """
    weights: dict[str, float] = {}
    term_names: list[str] = []
    if spec.query is not None and spec.query_weight != 0:
        if not spec.query.has_color_terms:
            raise RefineError("the connected query has no colour, statistic, region or layout term to score renders "
                              "by (its text parts need `text` and a CLIP model here); add one on the Noise Query "
                              "(Colour) node, or set query_weight to 0.")
        probe = query_terms(spec.query, [np.zeros((8, 8, 3), np.uint8)])  # names and weights; checks every part
        for t in probe:
            if t.weight != 0:
                weights[t.name] = float(spec.query_weight) * float(t.weight)
                term_names.append(t.name)
    if spec.clip_weight != 0:
        if not spec.text.strip():
            raise RefineError("the CLIP part of the refine metric has an empty text: type what the image should show "
                              "in `text`, or set clip_weight to 0.")
        if spec.embedder is None:
            raise RefineError("the CLIP part of the refine metric needs a CLIP model; choose one in clip_model.")
        weights["clip"] = float(spec.clip_weight)
    if spec.aesthetic is not None and spec.aesthetic_weight != 0:
        if spec.embedder is None:
            raise RefineError("the aesthetic part of the refine metric needs a CLIP model for its embeddings; "
                              "choose one in clip_model (the LAION heads need ViT-L-14).")
        weights["aesthetic"] = float(spec.aesthetic_weight)
    metric = Metric(weights)  # refuses an empty metric and NaN weights
    text_vec = spec.embedder.encode_text([spec.text])[0] if "clip" in weights else None

    def score_parts(renders: Sequence[Any]) -> Mapping[str, np.ndarray]:
        images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)) for im in renders]
        out: dict[str, np.ndarray] = {}
        if term_names:
            assert spec.query is not None
            for t in query_terms(spec.query, images):
                if t.name in weights:
                    out[t.name] = np.asarray(t.score(None), np.float64)
        if "clip" in weights or "aesthetic" in weights:
            embs = embed_images(spec.embedder, images)
            if text_vec is not None:
                out["clip"] = clip_scores(embs, text_vec)
            if "aesthetic" in weights:
                out["aesthetic"] = np.asarray(spec.aesthetic(embs), np.float64)
        return out

    return score_parts, metric


def curve_image(scores: Sequence[float], curve: Sequence[float], width: int = 512, height: int = 256,
                stopped_at: int | None = None) -> np.ndarray:
    """uint8 [height, width, 3]: each render's score (grey dots) and the best so far (orange line), render order."""
    im = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(im)
    pad = 24
    n = len(scores)
    if n == 0:
        return np.asarray(im)
    lo, hi = float(min(scores)), float(max(scores))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(i: int, s: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i / max(n - 1, 1))
        y = height - pad - (height - 2 * pad) * (float(s) - lo) / (hi - lo)
        return x, y

    draw.rectangle([pad, pad, width - pad, height - pad], outline=(70, 70, 78))
    for i, s in enumerate(scores):
        x, y = xy(i, s)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(150, 150, 160))
    draw.line([xy(i, s) for i, s in enumerate(curve)] if n > 1 else [xy(0, curve[0]), xy(0, curve[0])],
              fill=(255, 150, 40), width=2)
    draw.text((pad, 4), f"best {curve[-1]:.4g}  start {scores[0]:.4g}  renders {n}", fill=(230, 230, 230))
    draw.text((pad, height - pad + 6), f"min {lo:.4g}  max {hi:.4g}", fill=(160, 160, 170))
    if stopped_at is not None:
        draw.text((width // 2, height - pad + 6), "stopped (Interrupt)", fill=(255, 120, 120))
    return np.asarray(im)
