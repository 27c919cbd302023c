"""Turning images into library rows: colour features, CLIP embeddings and thumbnails.

Split in two halves so callers can overlap them: ``prepare`` (decode-side CPU work,
thread-safe, runs in worker threads) and ``finish`` (the CLIP forward pass, one batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import IncompatibleLibraryError, NoiseQueryError
from ..library.manifest import MAX_THUMBNAIL_SIZE, THUMBNAIL_FORMATS, FeatureSet
from ..library.storage import encode_thumbnail
from . import color
from .clip import ClipEmbedder


@dataclass
class Prepared:
    colour: dict[str, np.ndarray]  # one row of each colour column (color.analyse_one)
    pixels: Any  # CLIP-preprocessed tensor [3, S, S] or None
    thumbnail: bytes | None


def feature_set(embedder: ClipEmbedder | None, *, thumbnail_size: int = 256, thumbnail_format: str = "webp") -> FeatureSet:
    if thumbnail_format.lower() not in THUMBNAIL_FORMATS:
        raise NoiseQueryError(f"Thumbnail format {thumbnail_format!r} is not supported; use {' or '.join(map(repr, THUMBNAIL_FORMATS))}.")
    if not 0 <= thumbnail_size <= MAX_THUMBNAIL_SIZE:
        raise NoiseQueryError(
            f"Thumbnail size {thumbnail_size} must be 0 (none) or a number of pixels up to {MAX_THUMBNAIL_SIZE}."
        )
    return FeatureSet(
        clip=embedder.identity if embedder is not None else None,
        color_version=color.COLOR_VERSION,
        thumbnail_size=int(thumbnail_size),
        thumbnail_format=thumbnail_format.lower(),
    )


class FeatureExtractor:
    """Computes every column of a library row for a batch of images."""

    def __init__(self, features: FeatureSet, embedder: ClipEmbedder | None):
        if (features.clip is None) != (embedder is None):
            if embedder is None:
                raise IncompatibleLibraryError(
                    f"This library stores CLIP features ({features.describe()}) but no CLIP model was given; load "
                    f"that CLIP model ({features.clip.describe() if features.clip else '?'}) to add entries to it."
                )
            raise IncompatibleLibraryError(
                f"This library is colour-only ({features.describe()}) but a CLIP model ({embedder.identity.describe()}) "
                "was given; add entries without a CLIP model (clip_model 'none'), or use a library built with CLIP."
            )
        if features.color_version != color.COLOR_VERSION:
            raise IncompatibleLibraryError(
                f"The library has colour features v{features.color_version}; this NoiseQuery computes "
                f"v{color.COLOR_VERSION} and never mixes the two in one library. Upgrade the library first: "
                "`python -m noisequery_core upgrade --library <folder>`."
            )
        self.features = features
        self.embedder = embedder

    def prepare(self, image: Image.Image) -> Prepared:
        """CPU work for one decoded image (thread-safe)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        colour = color.analyse_one(color.prepare(image))
        pixels = self.embedder.preprocess(image) if self.embedder is not None else None
        return Prepared(colour, pixels, encode_thumbnail(image, self.features))

    def finish(self, prepared: Sequence[Prepared]) -> tuple[dict[str, np.ndarray], list[bytes | None]]:
        """Run the CLIP model on a prepared batch; returns (columns, thumbnails) for LibraryWriter.append."""
        cols: dict[str, np.ndarray] = {name: np.stack([p.colour[name] for p in prepared]) for name in prepared[0].colour}
        if self.embedder is not None:
            import torch

            cols["clip"] = self.embedder.encode_images(torch.stack([p.pixels for p in prepared])).astype(np.float16)
        return cols, [p.thumbnail for p in prepared]

    def __call__(self, images: Sequence[Image.Image]) -> tuple[dict[str, np.ndarray], list[bytes | None]]:
        return self.finish([self.prepare(im) for im in images])
