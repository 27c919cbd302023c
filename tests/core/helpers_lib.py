"""Builders for small libraries with hand-made rows (no images needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noisequery_core.library.manifest import ClipIdentity, FeatureSet, GenerationKey
from noisequery_core.library.storage import Library
from noisequery_core.search import color, palette


def feature_set(dim: int | None = 16, thumbs: int = 0) -> FeatureSet:
    clip = ClipIdentity("fake", "v1", dim) if dim else None
    return FeatureSet(clip=clip, color_version=color.COLOR_VERSION, thumbnail_size=thumbs)


def rows(n: int, dim: int | None = 16, rng: np.random.Generator | None = None, clip: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    cols: dict[str, np.ndarray] = {  # one column per color.COLUMNS_BY_VERSION[COLOR_VERSION]
        "stats": rng.uniform(0, 1, (n, len(color.STATS))).astype(np.float32),
        # Every row the same neutral palette (all mid-grey), so colour terms rank nothing by themselves.
        "palette": np.broadcast_to(np.array([palette.code_of_lab(np.array([50.0, 0.0, 0.0])), 0], np.uint16), (n, palette.PALETTE_SIZE, 2)).copy(),
        "palette_shares": np.pad(np.full((n, len(color.REGION_NAMES), 1), 255, np.uint8), ((0, 0), (0, 0), (0, palette.PALETTE_SIZE - 1))),
        "layout": rng.integers(0, 256, (n, color.GRID, color.GRID, 3), dtype=np.uint8),
        "regions": rng.uniform(0, 100, (n, len(color.REGION_NAMES), 3)).astype(np.float16),
    }
    if dim:
        if clip is None:
            clip = rng.standard_normal((n, dim)).astype(np.float32)
            clip /= np.linalg.norm(clip, axis=1, keepdims=True)
        cols["clip"] = clip.astype(np.float16)
    return cols


def make_library(path: Path, seeds: list[int] | np.ndarray, dim: int | None = 16, gen: GenerationKey | None = None, **kw: object) -> Library:
    lib = Library.create(path, gen or GenerationKey(model="m"), feature_set(dim))
    with lib.writer(durable=False) as w:
        w.append(np.asarray(seeds, dtype=np.uint64), rows(len(seeds), dim, **kw))  # type: ignore[arg-type]
    return lib
