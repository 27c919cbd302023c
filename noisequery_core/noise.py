"""Initial noise exactly as ComfyUI's KSampler draws it for one seed at batch size 1.

ComfyUI (comfy.sample.prepare_noise) seeds a CPU generator with the seed and draws
``torch.randn`` of the latent's shape for the whole batch at once, so item i of a batch is
NOT what seed+i or seed alone would give. A library entry must equal a batch-1 KSampler
run, hence every seed's noise is drawn on its own here and stacked. Kept in sync with
ComfyUI's prepare_noise; tests/host checks the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .library.storage import SEED_MAX  # seeds are full uint64, the library's row keys


def seed_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise of ``shape`` (C, H, W or 1, C, H, W) for one seed, drawn on the CPU."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) & SEED_MAX)
    return torch.randn(tuple(shape), dtype=dtype, generator=gen, device="cpu")


def batch_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(seeds), *shape] where item i is exactly ``seed_noise(seeds[i], (1, *shape))[0]``."""
    return torch.cat([seed_noise(s, (1, *shape), dtype) for s in seeds], dim=0)
