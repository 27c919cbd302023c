"""The hooks HighlightScribbleGuide puts on a MODEL: cross-attention bias and attention refocusing.

How it attaches (and why it composes with other packs):

* Attention modulation goes through ``transformer_options["optimized_attention_override"]``,
  ComfyUI's wrapper around every attention call in the UNet. It adds a bias (the ``mask``
  argument every ComfyUI attention backend accepts as an additive logit bias) to cross-attention
  calls only, then calls the attention function it was given, or the override that was already
  installed (chained, not replaced). attn1/attn2 patches, output patches, wrappers, LoRAs and
  ControlNets of other packs keep working. An attn2 *replace* patch of another pack (IPAdapter
  style) computes attention itself without this wrapper: those layers are left unguided, which
  ``HighlightRuntime.layers_seen`` lets the node report.
* Refocusing is a PREDICT_NOISE wrapper (ComfyUI's wrapper list, so it also composes): in its
  steps it runs the positive conditioning once with gradients, takes the loss of
  noisequery_core.guidance.highlight.refocus_loss on the captured attention maps, moves the latent
  against the gradient, predicts from the moved latent and returns that prediction shifted by
  the move (the sampler keeps its own x, so the move is carried in the denoised estimate).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..noisequery_core.guidance.highlight import (
    BIAS_INSIDE,
    BIAS_OUTSIDE,
    Highlight,
    attention_bias,
    guidance_weight,
    highlight_map,
    level_shape,
    refocus_loss,
)

log = logging.getLogger("noisequery")

OVERRIDE_KEY = "optimized_attention_override"
CAPTURE_KEY = "noisequery_highlight_capture"
WRAPPER_KEY = "noisequery_highlight"


@dataclass(frozen=True)
class GuideSettings:
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 0.6
    schedule: str = "cosine"
    softness: float = 0.5
    inside: float = BIAS_INSIDE
    outside: float = BIAS_OUTSIDE
    refocus_steps_percent: float = 0.0  # refocus while percent < start + this
    refocus_iterations: int = 0
    refocus_step_size: float = 0.05


class _Capture:
    """Where refocusing collects attention maps. Not a list or dict on purpose: ComfyUI's
    merge_nested_dicts copies those when it assembles transformer_options."""

    def __init__(self) -> None:
        self.records: list[Any] = []


class HighlightRuntime:
    """Per-patched-model state: region maps per grid, token columns, sigma -> progress."""

    def __init__(self, highlights: Sequence[Highlight], token_columns: Sequence[Sequence[int]], context_len: int,
                 settings: GuideSettings, sigma_to_percent: Callable[[float], float], aspect: float,
                 previous_override: Callable[..., Any] | None = None):
        self.highlights = list(highlights)
        self.token_columns = [list(c) for c in token_columns]
        self.context_len = int(context_len)
        self.settings = settings
        self.sigma_to_percent = sigma_to_percent
        self.aspect = aspect
        self.previous_override = previous_override
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._bias: dict[tuple[Any, ...], torch.Tensor] = {}
        self._lock = threading.Lock()
        self.layers_seen = 0  # cross-attention calls that received a bias (diagnostics, tests)
        self.refocus_calls = 0
        self.refocus_losses: list[tuple[float, int, float]] = []  # (sigma, iteration, loss before the update), recent steps

    def __deepcopy__(self, memo: dict[int, Any]) -> HighlightRuntime:
        # ModelPatcher.clone() deep-copies model_options; the runtime is shared by clones on purpose
        # (its caches are pure functions of its settings) and holds a lock that cannot be copied.
        return self

    # -------------------------------------------------------------- maps and bias

    def regions(self, h: int, w: int) -> torch.Tensor:
        """[P, h*w] soft regions at one grid size (cached)."""
        with self._lock:
            got = self._maps.get((h, w))
            if got is None:
                got = torch.stack([highlight_map(hl, h, w, self.aspect, self.settings.softness).reshape(-1)
                                   for hl in self.highlights])
                self._maps[(h, w)] = got
            return got

    def weight_at(self, sigma: torch.Tensor | None) -> float:
        if sigma is None:
            return 0.0
        pct = self.sigma_to_percent(float(sigma.reshape(-1).max()))
        s = self.settings
        return s.strength * guidance_weight(pct, s.start_percent, s.end_percent, s.schedule)

    def bias_for(self, h: int, w: int, n_keys: int, weight: float, device: torch.device, dtype: torch.dtype
                 ) -> torch.Tensor:
        """[h*w, n_keys] bias on ``device``; keys beyond our prompt's length repeat it (ComfyUI tiles conds to a
        common length). Cached per device and dtype, so a step's many attention calls transfer it once."""
        key = (h, w, n_keys, round(weight, 6), str(device), dtype)
        with self._lock:
            got = self._bias.get(key)
        if got is None:
            base = attention_bias(self.regions(h, w), self.token_columns, self.context_len, weight,
                                  self.settings.inside, self.settings.outside)
            got = base.repeat(1, n_keys // self.context_len).to(device, dtype)
            with self._lock:
                if len(self._bias) > 64:
                    self._bias.clear()
                self._bias[key] = got
        return got

    # -------------------------------------------------------------- attention override

    def _next(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        q, k, v, heads = args[:4]
        rest = args[4:]
        mask = kwargs.pop("mask", rest[0] if rest else None)
        args = (q, k, v, heads)
        kwargs["mask"] = mask
        to = kwargs.get("transformer_options") or {}
        skip = bool(kwargs.get("skip_reshape", False))
        nq, nk = (q.shape[2], k.shape[2]) if skip else (q.shape[1], k.shape[1])
        # Self-attention always has as many keys as queries; cross-attention has the text tokens.
        if nk == nq or nk % self.context_len != 0:
            return self._next(func, args, kwargs)
        shape = to.get("original_shape")
        grid = level_shape(nq, (int(shape[2]), int(shape[3]))) if shape is not None and len(shape) == 4 else None
        if grid is None:
            return self._next(func, args, kwargs)
        weight = self.weight_at(to.get("sigmas"))
        capture = to.get(CAPTURE_KEY)
        if weight == 0.0 and capture is None:
            return self._next(func, args, kwargs)
        b = q.shape[0]
        cou = list(to.get("cond_or_uncond") or [0])
        per = max(b // max(len(cou), 1), 1)
        is_cond = torch.tensor([cou[min(i // per, len(cou) - 1)] == 0 for i in range(b)], device=q.device)
        full = None
        if weight != 0.0:
            bias = self.bias_for(grid[0], grid[1], nk, weight, q.device, q.dtype)
            full = bias[None] * is_cond[:, None, None].to(q.dtype)  # [B, Nq, Nk]; uncond rows unbiased
            self.layers_seen += 1
        if mask is not None and full is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            full = full + mask.to(q.dtype) if mask.ndim <= 3 else full[:, None] + mask.to(q.dtype)
        elif full is None:
            full = mask
        kwargs["mask"] = full
        if capture is not None:
            return self._explicit_attention(q, k, v, heads, full, skip, bool(kwargs.get("skip_output_reshape", False)),
                                            grid, is_cond, capture)
        return self._next(func, args, kwargs)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: Any,
                            skip: bool, skip_out: bool, grid: tuple[int, int], is_cond: torch.Tensor,
                            capture: _Capture) -> torch.Tensor:
        """Differentiable attention that records each phrase's attention per pixel (refocusing)."""
        if skip:
            b, _, n, dh = q.shape
            qh, kh, vh = q, k, v
        else:
            b, n, inner = q.shape
            dh = inner // heads
            qh, kh, vh = (t.reshape(t.shape[0], -1, heads, dh).transpose(1, 2) for t in (q, k, v))
        sim = (qh.float() @ kh.float().transpose(-1, -2)) * dh ** -0.5
        if bias is not None:
            bb = bias.float()
            sim = sim + (bb[:, None] if bb.ndim == 3 else bb)
        p = sim.softmax(-1)
        out = (p.to(vh.dtype) @ vh)
        probs = [p[..., [c for c in cols if c < p.shape[-1]]].sum(-1).mean(1) for cols in self.token_columns]  # [B, N]
        capture.records.append((grid, is_cond, probs))
        if skip_out:
            return out
        return out.transpose(1, 2).reshape(b, n, heads * dh)

    # -------------------------------------------------------------- refocusing (PREDICT_NOISE wrapper)

    def refocus_active(self, sigma: torch.Tensor) -> bool:
        s = self.settings
        if s.refocus_iterations <= 0 or s.refocus_steps_percent <= 0:
            return False
        pct = self.sigma_to_percent(float(sigma.reshape(-1).max()))
        return s.start_percent - 1e-9 <= pct < s.start_percent + s.refocus_steps_percent

    def refocus_loss_of(self, captured: list[Any]) -> torch.Tensor:
        losses = []
        for grid, is_cond, probs in captured:
            regions = self.regions(*grid).to(probs[0].device)
            for i, pr in enumerate(probs):
                sel = pr[is_cond] if bool(is_cond.any()) else pr
                losses.append(refocus_loss(sel.float(), regions[i]))
        if not losses:
            raise RuntimeError("refocusing captured no cross-attention maps")
        return torch.stack(losses).mean()

    def predict_noise_wrapper(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor,
                              model_options: dict[str, Any], seed: Any) -> torch.Tensor:
        if not self.refocus_active(timestep):
            return executor(x, timestep, model_options, seed)
        import comfy.samplers  # glue: the host's batched conditioning call

        guider = executor.class_obj
        positive = guider.conds.get("positive")
        if not positive:
            return executor(x, timestep, model_options, seed)
        s = self.settings
        sigma = float(timestep.reshape(-1).max())
        with torch.inference_mode(False), torch.enable_grad(), _autograd_safe_weights(guider.inner_model):
            x_ = x.detach().clone().requires_grad_(True)
            for it in range(s.refocus_iterations):
                captured = _Capture()
                mo = dict(model_options)
                mo["transformer_options"] = dict(model_options.get("transformer_options", {}))
                mo["transformer_options"][CAPTURE_KEY] = captured
                comfy.samplers.calc_cond_batch(guider.inner_model, [positive], x_, timestep.detach().clone(), mo)
                loss = self.refocus_loss_of(captured.records)
                self.refocus_losses = [*self.refocus_losses[-63:], (sigma, it, float(loss.detach()))]
                (grad,) = torch.autograd.grad(loss, x_)
                g = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
                x_ = (x_ - s.refocus_step_size * sigma * g).detach().requires_grad_(True)
                self.refocus_calls += 1
            moved = x_.detach()
        moved = moved.clone()  # a normal tensor again for the inference-mode sampler
        return executor(moved, timestep, model_options, seed) + (moved - x)


@contextlib.contextmanager
def _autograd_safe_weights(module: torch.nn.Module) -> Iterator[None]:
    """Temporarily swap inference-mode weights for normal copies.

    ComfyUI loads models inside torch.inference_mode(), and autograd refuses to save inference
    tensors for backward, even for a gradient with respect to the input only. The copies live
    for one refocused step; the original tensors are put back untouched.
    """
    swapped: list[tuple[torch.nn.Module, str, bool, Any]] = []
    try:
        for mod in module.modules():
            stores: tuple[tuple[dict[str, Any], bool], ...] = ((mod._parameters, True), (mod._buffers, False))
            for store, is_param in stores:
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        swapped.append((mod, name, is_param, t))
                        copy = t.clone()
                        store[name] = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
        yield
    finally:
        for mod, name, is_param, t in swapped:
            (mod._parameters if is_param else mod._buffers)[name] = t


def install(model: Any, runtime: HighlightRuntime) -> Any:
    """A clone of ``model`` (ModelPatcher) with the runtime's hooks; the input model is untouched."""
    import comfy.patcher_extension

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to = dict(to)
    runtime.previous_override = to.get(OVERRIDE_KEY)
    to[OVERRIDE_KEY] = runtime
    m.model_options["transformer_options"] = to
    if runtime.settings.refocus_iterations > 0 and runtime.settings.refocus_steps_percent > 0:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY,
                               runtime.predict_noise_wrapper)
    return m
