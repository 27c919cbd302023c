"""Glue every node family shares: NOISE objects, IMAGE <-> uint8/PIL conversions, the seed range, latents."""

from __future__ import annotations

import base64
import io as _io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..noisequery_core import SEED_MAX, Library, QueryError
from ..noisequery_core.noise import batch_noise

# ------------------------------------------------------------------ NOISE for SamplerCustomAdvanced


def latent_positions(input_latent: dict[str, Any]) -> list[int]:
    """Where each item of a LATENT sits in the batch it came from.

    A LATENT cut out of a larger batch (LatentFromBatch, RepeatLatentBatch, ...) carries
    ``batch_index``, and ComfyUI's RandomNoise gives item i the noise of position batch_index[i]
    (comfy.sample.prepare_noise); without it item i is position i.
    """
    index = input_latent.get("batch_index")
    if index is None:
        return list(range(int(input_latent["samples"].shape[0])))
    return [int(i) for i in index]


class PackNoise:
    """A NOISE (``.seed`` and ``generate_noise(latent)``) whose position p of a batch gets item ``p % count``.

    Subclasses say what the ``count`` items are (``items``). ``generate_noise`` maps the latent's
    items to positions as RandomNoise does (latent_positions), so a LATENT with a batch_index gets
    the same noise as those items of the full batch. ``seed`` drives the per-step noise of
    stochastic samplers (as RandomNoise's seed does), shared by the whole batch as in any ComfyUI batch.
    """

    seed: int = 0
    count: int = 1

    def items(self, positions: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[len(positions), *shape] CPU noise; every position is in 0..count-1."""
        raise NotImplementedError

    def generate_noise(self, input_latent: dict[str, Any]) -> torch.Tensor:
        samples = input_latent["samples"]
        positions = [p % self.count for p in latent_positions(input_latent)]
        return self.items(positions, tuple(samples.shape[1:]), samples.dtype)


class SeedNoise(PackNoise):
    """Item i is exactly KSampler's batch-1 noise for ``seeds[i]`` (noisequery_core.noise)."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.count = len(self.seeds)
        self.seed = self.seeds[0]

    def items(self, positions: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return batch_noise([self.seeds[p] for p in positions], shape, dtype=dtype)


class MadeNoise(PackNoise):
    """Item i is ``make(shape, dtype)[i]``, where ``make`` returns all ``count`` items for a latent item shape."""

    def __init__(self, seed: int, count: int, make: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]):
        self.seed = int(seed)
        self.count = int(count)
        self._make = make

    def items(self, positions: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        made = self._make(shape, dtype)
        if list(positions) == list(range(made.shape[0])):
            return made
        return made[list(positions)]


class PickedNoise(PackNoise):
    """Item ``index`` of another NOISE's ``of_count``-item batch, for every item of the latent it is asked for."""

    def __init__(self, inner: Any, index: int, of_count: int):
        self.inner, self.index, self.of_count = inner, int(index), int(of_count)
        self.seed = getattr(inner, "seed", 0)

    def items(self, positions: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # The whole batch is asked for, not a batch_index, so a NOISE that ignores batch_index still gives its item.
        full = torch.zeros((self.of_count, *shape), dtype=dtype)
        item = self.inner.generate_noise({"samples": full})[self.index : self.index + 1]
        return item.repeat(len(positions), *([1] * len(shape)))


class MissingNoise(PackNoise):
    """A NOISE output whose source was not connected: sampling with it fails with ``message``."""

    def __init__(self, message: str):
        self.message = message

    def items(self, positions: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise QueryError(self.message)


# ------------------------------------------------------------------ IMAGE conversions


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE [B, H, W, C] float 0..1 -> uint8 [B, H, W, 3], rounded to the nearest level."""
    return (images[..., :3].detach().cpu().float().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """IMAGE [B, H, W, C] -> one RGB PIL image per item."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def to_image(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or uint8 [H, W, 3] arrays of one size -> IMAGE [B, H, W, 3] float32 0..1."""
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def data_url(image: torch.Tensor, max_side: int = 512, quality: int = 85) -> str:
    """The first item of an IMAGE as a JPEG data URL at most ``max_side`` pixels wide and high (for a widget)."""
    im = to_pil(image[:1])[0]
    im.thumbnail((max_side, max_side))
    buf = _io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_thumbnails(lib: Library, seeds: Sequence[int]) -> torch.Tensor:
    """Library entries' thumbnails as an IMAGE batch of one size (black where a thumbnail is missing, a link,
    unreadable or oversized: Library.load_thumbnail never follows links and logs why it skipped one)."""
    size = lib.features.thumbnail_size or 64
    shape = lib.generation.latent_shape
    if shape:
        h, w = shape[1], shape[2]  # only the aspect ratio matters (the latent's downscale factor cancels)
        scale = size / max(h, w)
        tw, th = max(8, round(w * scale)), max(8, round(h * scale))
    else:
        tw = th = size
    out: list[Image.Image | np.ndarray] = []
    for s in seeds:
        im = lib.load_thumbnail(s)
        if im is None:
            out.append(np.zeros((th, tw, 3), np.uint8))
            continue
        out.append(im.convert("RGB").resize((tw, th), Image.Resampling.BICUBIC))
    if not out:
        return torch.zeros((1, th, tw, 3))
    return to_image(out)


# ------------------------------------------------------------------ latents and shared inputs


# ComfyUI's empty-latent nodes: 1/8 of the image with 4 channels (EmptyLatentImage; samplers widen the channels for
# 16-channel SD3 / Flux models, comfy.sample.fix_empty_latent_channels), except Flux 2 (EmptyFlux2LatentImage:
# 128 channels at 1/16). Keyed by the model's latent_format class name.
LATENT_DOWNSCALE = {"Flux2": 16}
DEFAULT_DOWNSCALE = 8


def latent_shape(width: int, height: int, channels: int = 4, downscale: int = DEFAULT_DOWNSCALE) -> tuple[int, int, int]:
    """A latent's item shape for an image size, as ComfyUI's empty-latent nodes make it:
    (channels, height // downscale, width // downscale); the defaults are EmptyLatentImage's (4, /8).

    An empty 4-channel latent is widened by the samplers for models that need more channels, so nodes without a
    model input may keep the defaults; pass the model's values (sampling.model_latent) when it is known.
    """
    return int(channels), int(height) // int(downscale), int(width) // int(downscale)


def empty_latent(batch: int, shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """A LATENT of ``batch`` zero items of ``shape`` (C, h, w)."""
    return {"samples": torch.zeros((batch, *shape))}


def latent_size_inputs() -> list[Any]:
    """The width / height inputs of nodes that output an empty latent."""
    return [
        io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Width of the latent output, in pixels."),
        io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Height of the latent output, in pixels."),
    ]


def seed_input(name: str, default: int, tooltip: str) -> Any:
    """A seed INT input over ComfyUI's whole seed range that the frontend leaves alone.

    control_after_generate=False: the frontend otherwise gives any INT named like a seed a "randomize after each
    run" control, which would move a walk's endpoints (or break an explorer's history) between runs.
    """
    return io.Int.Input(name, default=default, min=0, max=SEED_MAX, control_after_generate=False, tooltip=tooltip)
