"""The frozen ComfyUI model as a differentiable noise predictor, and the model families it trains on.

NoiseCLR (nodes/directions_runtime.py) and the seed-invariant prompt (nodes/exploration_invariant_nodes.py)
both optimise conditioning through a model whose weights stay untouched; the workarounds that make that
possible in ComfyUI 0.8.0 (inference tensors, Flux's fused RoPE and in-place residual adds) live here once,
with what both need to know of a model: its family (SD1.x/SD2.x, SDXL, SD3, Flux.1, or refused), the width
of its text conditioning, how it noises a latent (ComfyUI's training target) and what its ``y`` input holds
besides the pooled vector.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
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
    # Flux.1 exactly (as family_of decides): its blocks need the two workarounds below.
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


# ------------------------------------------------------------------ model families


@dataclass(frozen=True)
class Family:
    """A model family the training nodes tune conditioning on, and how its conditioning enters the model.

    key: the name stored in the files ("sd", "sdxl", "sd3", "flux"); label: the words users see.
    pooled: the model also takes the prompt's pooled vector (SDXL: the first part of the ADM ``y`` input,
    the rest being size embeddings; SD3 and Flux: all of ``y``, into adaLN), so what is tuned gains a pooled part.
    joint: the conditioning tokens join the image tokens in joint attention (MMDiT / Flux double blocks)
    instead of feeding cross-attention; ComfyUI batches them as CONDRegular, not CONDCrossAttn.
    """

    key: str
    label: str
    pooled: bool
    joint: bool


SD = Family("sd", "SD1.x/SD2.x", pooled=False, joint=False)
SDXL = Family("sdxl", "SDXL", pooled=True, joint=False)
SD3 = Family("sd3", "SD3/SD3.5", pooled=True, joint=True)
FLUX = Family("flux", "Flux.1", pooled=True, joint=True)
FAMILIES = {f.key: f for f in (SD, SDXL, SD3, FLUX)}
# Flux-dev is guidance-distilled: its guidance input is part of the conditioning. ComfyUI's own default
# (comfy.model_base.Flux.extra_conds), the value a plain CLIPTextEncode prompt samples with.
FLUX_DEFAULT_GUIDANCE = 3.5


def family_label(key: str) -> str:
    """Words for a family key read from a file ('sdxl' -> "SDXL ('sdxl')"); unknown keys shown as they are."""
    f = FAMILIES.get(key)
    return f"{f.label} ({key!r})" if f else repr(key)


def family_of(model: Any, who: str, error: type[NoiseQueryError]) -> Family:
    """The family of a MODEL, or ``error`` ("<who>: ...") naming why conditioning cannot be tuned on it.

    Exact classes for the DiTs: Flux2 (Mistral conditioning), Chroma (no pooled input) and the other DiTs
    subclass or resemble these but condition differently, and nothing here was tested on them.
    """
    base = model.model
    kind = type(base.model_config).__name__
    if type(base) is comfy.model_base.Flux:
        cfg = base.model_config.unet_config
        if cfg.get("in_channels", 16) != cfg.get("out_channels", 16):
            raise error(f"{who}: {kind} takes extra image channels (a Fill/inpainting or control Flux); only plain "
                        f"text-to-image models are supported. Use a Flux.1 dev/schnell checkpoint.")
        if not cfg.get("vec_in_dim"):
            raise error(f"{who}: {kind} has no pooled-vector input (vector_in); it is not a Flux.1 dev/schnell "
                        f"model, which {who} supports.")
        return FLUX
    if type(base) is comfy.model_base.SD3:
        return SD3
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return SDXL
    if type(base).__name__ in ("Flux2", "Chroma", "ChromaRadiance") or not getattr(base, "diffusion_model", None) \
            or not isinstance(unet_config(model).get("context_dim"), int):
        raise error(
            f"{who}: {kind} ({type(base).__name__}) is not a family {who} supports: SD1.x/SD2.x, SDXL, SD3/SD3.5 "
            f"and Flux.1. It tunes a model's text-conditioning space, which this model lays out differently (or "
            f"has none).")
    if getattr(base, "adm_channels", 0):
        raise error(
            f"{who}: {kind} takes an ADM/'y' input that is not a text prompt's pooled vector (e.g. an unCLIP image "
            f"embedding); it cannot be tuned as a prompt. Use an SD1.x/SD2.x, SDXL, SD3 or Flux.1 checkpoint.")
    return SD


def unet_config(model: Any) -> dict[str, Any]:
    return getattr(model.model.model_config, "unet_config", {}) or {}


def context_dim_of(model: Any) -> int | None:
    """The width of the model's text-conditioning tokens (cross-attention context or joint-attention input)."""
    cfg = unet_config(model)
    dim = cfg.get("context_dim") or cfg.get("context_in_dim")  # UNets / Flux
    if not dim:
        embedder = getattr(getattr(model.model, "diffusion_model", None), "context_embedder", None)  # MMDiT (SD3)
        dim = getattr(embedder, "in_features", None)
    return int(dim) if dim else None


def check_supported(model: Any, who: str, error: type[NoiseQueryError]) -> Family:
    """The model's family, or ``error`` saying why ``who`` cannot tune conditioning on it."""
    base = model.model
    kind = type(base.model_config).__name__
    family = family_of(model, who, error)
    if context_dim_of(model) is None:
        raise error(f"{who}: {kind} has no text-conditioning context to tune.")
    allowed = {SD.key: (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION),
               SDXL.key: (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION),
               SD3.key: (comfy.model_base.ModelType.FLOW,), FLUX.key: (comfy.model_base.ModelType.FLUX,)}[family.key]
    if base.model_type not in allowed:
        raise error(f"{who}: {kind} predicts {base.model_type.name}; on {family.label} only "
                    f"{', '.join(t.name.lower() for t in allowed)} models are supported.")
    return family


def noising_of(model: Any) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """How x_t is made in the model's sampling space, as ComfyUI's training node makes it: None (x0 + σ·noise, the
    core's default) for eps/v UNets, the model's own noise_scaling for the rest (flow: (1−σ)·x0 + σ·noise)."""
    ms = model.model.model_sampling
    if isinstance(ms, comfy.model_sampling.EPS) and not isinstance(ms, comfy.model_sampling.CONST):
        return None

    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return ms.noise_scaling(sigma, noise, x0)

    return add_noise


# The options of a prompt's CONDITIONING that SDXL's size embeddings read (CLIPTextEncodeSDXL sets them).
SIZE_OPTIONS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def pooled_rest(model: Any, pooled: torch.Tensor, width: int, height: int, options: dict[str, Any] | None,
                who: str, error: type[NoiseQueryError]) -> torch.Tensor:
    """[1, R]: the part of the model's ``y`` that is not the pooled vector, as sampling a ``width`` x ``height``
    image with a prompt of these ``options`` builds it (SDXL: size embeddings, R = 1536, from the prompt's
    width/height/crop/target options when it has them, else the image size; SD3/Flux: R = 0). Checks that ``y``
    starts with the pooled vector, the layout every pooled family here has."""
    base = model.model
    p = pooled.float().reshape(1, -1)
    kw: dict[str, Any] = {"width": width, "height": height, "crop_w": 0, "crop_h": 0}
    kw.update({k: v for k, v in (options or {}).items() if k in SIZE_OPTIONS})
    kw.setdefault("target_width", kw["width"])
    kw.setdefault("target_height", kw["height"])
    with torch.no_grad():
        y = base.encode_adm(pooled_output=p, prompt_type="positive", device=p.device, **kw)
    n = p.shape[1]
    if y is None or y.shape[1] < n or not torch.equal(y[:, :n].float().cpu(), p.cpu()):
        raise error(f"{who}: {type(base.model_config).__name__}'s 'y' input does not start with the prompt's pooled "
                    f"vector ({n} wide); a tuned pooled part would not reach the model.")
    return y[:, n:].detach().float().clone()

