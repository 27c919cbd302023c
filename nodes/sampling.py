"""Rendering seeds exactly as a batch-1 KSampler would, but in batches.

ComfyUI draws the initial noise for a whole batch from one generator and, in stochastic
samplers, the per-step noise too, so batch item i is not what seed i gives alone. Here the
initial noise is drawn per seed (noisequery_core.noise) and, for the stochastic samplers
listed below, a per-item noise sampler replays what each seed's own batch-1 run would draw.
Samplers not listed are rendered one seed at a time, which is exact by construction.
tests/host/test_build_reproducibility.py checks every listed sampler against KSampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler
from PIL import Image

from ..noisequery_core.noise import batch_noise
from ._glue import DEFAULT_DOWNSCALE, LATENT_DOWNSCALE, latent_shape, to_pil

# No per-step randomness: a batch equals its items run alone.
BATCH_PLAIN = {
    "euler", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
    "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2",
}
# Per-step noise from k_diffusion.default_noise_sampler(x, seed): one generator per item.
BATCH_DEFAULT_NOISE = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "lcm"}
# Per-step noise from a Brownian tree seeded with the seed (CPU tree): one tree per item.
BATCH_BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}


def strategy(sampler_name: str) -> str:
    if sampler_name in BATCH_PLAIN:
        return "batched"
    if sampler_name in BATCH_DEFAULT_NOISE:
        return "batched+default-noise"
    if sampler_name in BATCH_BROWNIAN:
        return "batched+brownian"
    return "per-seed"


def per_item_default_noise(seeds: Sequence[int], x: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
    """What default_noise_sampler draws for each seed at batch 1, stacked (kept in sync with
    comfy/k_diffusion/sampling.py: CPU generators are seeded seed+1, device ones seed)."""
    dev = x.device
    gens = []
    for s in seeds:
        g = torch.Generator(device=dev)
        g.manual_seed(int(s) + 1 if dev.type == "cpu" else int(s))
        gens.append(g)
    shape = (1, *x.shape[1:])
    return lambda sigma, sigma_next: torch.cat(
        [torch.randn(shape, dtype=x.dtype, layout=x.layout, device=dev, generator=g) for g in gens]
    )


def _sampler_with_noise(sampler_name: str, seeds: Sequence[int], sigmas: torch.Tensor, x_like: torch.Tensor) -> Any:
    if strategy(sampler_name) == "batched+brownian":
        nonzero = sigmas[sigmas > 0]
        ns: Any = BrownianTreeNoiseSampler(x_like, nonzero.min(), sigmas.max(), seed=[int(s) for s in seeds], cpu=True)
    else:
        ns = per_item_default_noise(seeds, x_like)
    return comfy.samplers.ksampler(sampler_name, {"noise_sampler": ns})


def model_latent(model: Any, vae: Any = None) -> tuple[int, int]:
    """(latent channels, image pixels per latent cell) for a MODEL (and its VAE when given).

    Channels come from the model's latent_format (4 for SD1.x/SDXL, 16 for SD3/Flux, ...); the spatial factor from
    the VAE when there is one, else from ComfyUI's empty-latent convention for that latent format.
    """
    fmt = model.get_model_object("latent_format")
    channels = int(getattr(fmt, "latent_channels", 4))
    downscale = LATENT_DOWNSCALE.get(type(fmt).__name__, DEFAULT_DOWNSCALE)
    if vae is not None:
        try:
            ratio = vae.spacial_compression_encode()
        except Exception:  # an older or foreign VAE object: keep the latent format's convention
            ratio = None
        if isinstance(ratio, int) and ratio > 0:
            downscale = ratio
    return channels, int(downscale)


def model_family(model: Any) -> str:
    """What ComfyUI detected the model as and how it predicts, e.g. "SD15:eps", "SDXL:eps", "SD3:flow",
    "Flux:flux": ComfyUI's model-config class name and model type (comfy.supported_models, comfy.model_base)."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    name = type(config).__name__ if config is not None else "unknown"
    model_type = getattr(inner, "model_type", None)
    kind = getattr(model_type, "name", "")
    return f"{name}:{kind.lower()}" if kind else name


def decode(vae: Any, samples: torch.Tensor) -> torch.Tensor:
    """As the VAEDecode node does: IMAGE [B, H, W, 3] float 0..1."""
    images = vae.decode(samples)
    if len(images.shape) == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return images


class SeedRenderer:
    """render(seeds) -> decoded images, each equal to a batch-1 KSampler run of that seed."""

    def __init__(
        self,
        model: Any,
        vae: Any,
        positive: Any,
        negative: Any,
        *,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        on_progress: Callable[[float], None] | None = None,
    ):
        self.model, self.vae = model, vae
        self.positive, self.negative = positive, negative
        self.steps, self.cfg = steps, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        # The latent KSampler samples for an empty latent of this size: the model's channels (what
        # fix_empty_latent_channels widens EmptyLatentImage to) at the VAE's spatial factor.
        channels, self.downscale = model_latent(model, vae)
        empty = torch.zeros((1, *latent_shape(width, height, channels, self.downscale)))
        self.latent_shape = tuple(comfy.sample.fix_empty_latent_channels(model, empty).shape[1:])
        self.family = model_family(model)
        self.on_progress = on_progress  # fraction (0..1) of the current render call done
        self._part = (0, 1)  # (index, count) of the sampling call inside the current render call

    @property
    def strategy(self) -> str:
        return strategy(self.sampler_name)

    def _callback(self) -> Any:
        if self.on_progress is None:
            return None
        cb, (i, n) = self.on_progress, self._part
        return lambda step, x0, x, total: cb((i + (step + 1) / max(total, 1)) / n)

    def _sample(self, seeds: Sequence[int]) -> torch.Tensor:
        noise = batch_noise(seeds, self.latent_shape)
        latent = torch.zeros((len(seeds), *self.latent_shape))
        if self.strategy in ("batched", "per-seed"):
            return comfy.sample.sample(
                self.model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, self.positive, self.negative,
                latent, denoise=1.0, callback=self._callback(), disable_pbar=True, seed=int(seeds[0]),
            )
        ks = comfy.samplers.KSampler(
            self.model, steps=self.steps, device=self.model.load_device, sampler=self.sampler_name,
            scheduler=self.scheduler, denoise=1.0, model_options=self.model.model_options,
        )
        sampler = _sampler_with_noise(self.sampler_name, seeds, ks.sigmas, latent.to(self.model.load_device))
        return comfy.sample.sample_custom(
            self.model, noise, self.cfg, sampler, ks.sigmas, self.positive, self.negative, latent,
            callback=self._callback(), disable_pbar=True, seed=int(seeds[0]),
        )

    def __call__(self, seeds: list[int]) -> list[Image.Image]:
        if self.strategy == "per-seed":
            parts = []
            for i, s in enumerate(seeds):
                self._part = (i, len(seeds))
                parts.append(self._sample([s]))
            samples = torch.cat(parts)
        else:
            self._part = (0, 1)
            samples = self._sample(seeds)
        return to_pil(decode(self.vae, samples))
