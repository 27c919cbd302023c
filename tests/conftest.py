"""Shared fixtures: synthetic seed images, tiny libraries, a deterministic fake CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from noisequery_core.library.manifest import ClipIdentity


def solid(rgb: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def halves(top: tuple[int, int, int], bottom: tuple[int, int, int], size: int = 64) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[: size // 2] = top
    a[size // 2 :] = bottom
    return Image.fromarray(a)


COLOR_WORDS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


class FakeEmbedder:
    """Deterministic stand-in for CLIP: text "red" ↦ the unit vector of the word's index.

    Image rows in tests are built with ``FakeEmbedder.vector(word)`` too, so a text query
    for a colour word must rank rows of that word first. Same interface as ClipEmbedder.
    """

    dim = 16

    def __init__(self, identity: ClipIdentity | None = None):
        self.identity = identity or ClipIdentity("fake", "v1", self.dim)

    @classmethod
    def vector(cls, word: str, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        v = np.zeros(cls.dim, np.float32)
        for w in word.split():
            if w in COLOR_WORDS:
                v[COLOR_WORDS.index(w)] += 1.0
        if not v.any():
            v[-1] = 1.0
        if noise and rng is not None:
            v = v + rng.standard_normal(cls.dim).astype(np.float32) * noise
        return v / np.linalg.norm(v)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vector(t) for t in texts])


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny open_clip architecture (real CLIP class, small widths) and random weights on disk."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tinyclip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = d / "tiny-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    st = d / "tiny.safetensors"
    save_file(sd, str(st))
    pt = d / "tiny.pt"
    torch.save(sd, pt)
    return {"config": cfg_path, "safetensors": st, "pt": pt, "dir": d}


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_files: dict[str, Path]):  # type: ignore[no-untyped-def]
    from noisequery_core.search.clip import ClipSpec, load_clip

    f = tiny_clip_files
    return load_clip(ClipSpec("", str(f["safetensors"]), str(f["config"])), allow_download=False)
