"""The frozen ComfyUI model as a differentiable noise predictor, shared by the pack's training nodes.

NoiseCLR (nodes/directions_runtime.py) and the seed-invariant prompt (nodes/exploration_invariant_nodes.py)
both optimise conditioning through a model whose weights stay untouched; the workarounds that make that
possible in ComfyUI 0.8.0 (inference tensors, Flux's fused RoPE and in-place residual adds) live here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import comfy.model_base
import comfy.model_management
import torch

from ..noisequery_core.errors import NoiseQueryError


class _Forward(torch.nn.Module):
    """Holds the BaseModel as a submodule so torch.func.functional_call can swap its weights."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.base.apply_model(x, sigma, c_crossattn=context, **(extra or {}))


def _rope_one(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., d] by ``freqs`` [..., d/2, 2, 2] (rotation matrices of adjacent pairs,
    as comfy.ldm.flux.math.rope builds them), written with plain differentiable tensor ops."""
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)  # [..., d/2, 1, (x0, x1)]
    rotated = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]  # [..., d/2, 2] = M @ (x0, x1)
    return rotated.reshape(x.shape).type_as(x)


def _rope_pair(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_one(xq, freqs), _rope_one(xk, freqs)


@contextlib.contextmanager
def differentiable_rope(flux: bool) -> Iterator[None]:
    """While training on Flux, its attention applies RoPE with plain tensor ops.

    ComfyUI 0.8.0 routes Flux's RoPE through comfy_kitchen's fused op (torch.ops.comfy_kitchen.apply_rope),
    which has no backward: the gradient to the direction tokens could not pass the joint attention. The
    module global that comfy.ldm.flux.math.attention looks up is swapped for the same rotation in plain
    ops, only around the training forward (ComfyUI runs one prompt at a time, so no sampling shares the
    swap), and put back however the forward ends. Sampling keeps the fused op.
    """
    if not flux:
        yield
        return
    import comfy.ldm.flux.math as flux_math

    saved = flux_math.apply_rope, flux_math.apply_rope1
    flux_math.apply_rope, flux_math.apply_rope1 = _rope_pair, _rope_one
    try:
        yield
    finally:
        flux_math.apply_rope, flux_math.apply_rope1 = saved


def make_predict_noise(model: Any, *, y_rest: torch.Tensor | None = None, guidance: float | None = None
                       ) -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """(predict_noise, sigmas) for the core's training loop. Call inside inference_mode(False).

    ``predict_noise(x, sigma, context, pooled=None)`` returns (x − denoised)/σ: ε for eps and v models, the
    velocity for flow models (SD3, Flux); per image the two differ by a positive factor, which the cosine
    loss does not see. With ``pooled`` [B, P], the model's ``y`` input is [pooled | y_rest] (``y_rest``
    [1, R]: SDXL's size embeddings, empty for SD3/Flux); ``guidance`` feeds Flux's guidance input.
    ``sigmas`` has 1000 entries (Flux's 10000-step table is resampled) so t_min/t_max mean the same everywhere.

    ComfyUI loads weights under torch.inference_mode, and inference tensors cannot be saved for
    backward; so the forward runs on clones of the diffusion model's weights (torch.func.functional_call),
    leaving the real weights untouched (the host tests check they stay bit-identical). Costs one
    extra copy of the model in memory while training. Weight patches (LoRAs) are already merged
    into the weights by load_models_gpu, so a LoRA-patched MODEL trains on the patched weights.
    """
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    base = model.model
    fwd = _Forward(base)
    params = {f"base.diffusion_model.{k}": v.detach().clone() for k, v in base.diffusion_model.named_parameters()}
    params.update({f"base.diffusion_model.{k}": v.detach().clone() for k, v in base.diffusion_model.named_buffers()})
    sigmas = base.model_sampling.sigmas.detach().clone().float()
    if sigmas.shape[0] != 1000:
        sigmas = sigmas[torch.linspace(0, sigmas.shape[0] - 1, 1000).round().long()]
    needs_y = bool(getattr(base, "adm_channels", 0))
    # Flux.1 exactly (as NoiseCLR's family_of decides): its blocks need the two workarounds below.
    flux = type(base) is comfy.model_base.Flux

    def call(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
             extra: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(fwd, params, (x, sigma, context, extra), strict=False)

    # ComfyUI's Flux blocks add their residuals in place (img += ..., x += ...) over tensors autograd has saved,
    # which makes backward fail; functionalize runs the same forward with those writes made out-of-place
    # (views and aliasing kept), so the values are the same and the gradient exists.
    forward = torch.func.functionalize(call) if flux else call

    def predict_noise(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                      pooled: torch.Tensor | None = None) -> torch.Tensor:
        extra: dict[str, torch.Tensor] = {}
        if pooled is not None:
            rest = y_rest if y_rest is not None else pooled.new_zeros(1, 0)
            extra["y"] = torch.cat([pooled, rest.to(pooled).expand(pooled.shape[0], -1)], dim=1)
        elif needs_y:
            raise NoiseQueryError("training forward: this model takes a pooled text vector ('y'); pass the "
                                  "pooled part to predict_noise (a caller bug, not a user setting).")
        if guidance is not None:
            extra["guidance"] = torch.full((x.shape[0],), float(guidance), device=x.device)
        with differentiable_rope(flux):
            denoised = forward(x, sigma, context, extra)
        # x = x0 + σ·ε (eps, v) or (1−σ)·x0 + σ·ε (flow): (x − denoised)/σ is ε or the velocity ε − x0.
        return (x - denoised) / sigma.view(-1, *([1] * (x.dim() - 1)))

    return predict_noise, sigmas
