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
* On SD3 (MMDiT) and Flux the same override sees each block's joint attention (text then image tokens in one
  sequence). Those models do not tell the attention the latent's size, so an APPLY_MODEL wrapper (also a
  composing wrapper) records it, with the text length, in the call's transformer_options; the override then lays
  out the sequence and adds the two-sided bias of noisequery_core.guidance.joint.
* Refocusing is a PREDICT_NOISE wrapper (ComfyUI's wrapper list, so it also composes): in its
  steps it runs the positive conditioning once with gradients, takes the refocus loss
  (noisequery_core.guidance.refocus) on the captured attention maps, moves the latent against
  the gradient, predicts from the moved latent and returns that prediction shifted by the move
  (the sampler keeps its own x, so the move is carried in the denoised estimate).

The maths (regions, bias, masks, attention maps, loss, step) is noisequery_core.guidance; this
module only adapts ComfyUI's calling conventions and state to it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..noisequery_core.guidance.attention import (
    attention_bias,
    combine_masks,
    cond_rows,
    merge_heads,
    phrase_attention,
    split_heads,
    tile_keys,
)
from ..noisequery_core.guidance.joint import (
    JointLayout,
    JointModel,
    joint_bias,
    joint_layout,
    joint_phrase_probs,
    patch_grid,
    phrase_key_positions,
)
from ..noisequery_core.guidance.refocus import PhraseAttention, refocus_loss_over_layers, refocus_step
from ..noisequery_core.guidance.regions import level_shape, region_stack
from ..noisequery_core.guidance.schedule import GuideSettings
from ..noisequery_core.guidance.strokes import Highlight

log = logging.getLogger("noisequery")

OVERRIDE_KEY = "optimized_attention_override"
CAPTURE_KEY = "noisequery_highlight_capture"
WRAPPER_KEY = "noisequery_highlight"
# Set by the APPLY_MODEL wrapper on joint-attention models: (latent h, latent w, text tokens) of the call, which
# Flux and MMDiT do not put in transformer_options themselves (UNets do: "original_shape").
SHAPE_KEY = "noisequery_highlight_shape"


class _Capture:
    """Where refocusing collects attention maps. Not a list or dict on purpose: ComfyUI's
    merge_nested_dicts copies those when it assembles transformer_options."""

    def __init__(self) -> None:
        self.records: list[PhraseAttention] = []


class HighlightRuntime:
    """Per-patched-model state: region maps per grid, token columns, sigma -> progress."""

    def __init__(self, highlights: Sequence[Highlight], token_columns: Sequence[Sequence[int]], context_len: int,
                 settings: GuideSettings, sigma_to_percent: Callable[[float], float], aspect: float,
                 previous_override: Callable[..., Any] | None = None, joint: JointModel | None = None):
        self.joint = joint  # None: a UNet's cross-attention; else the joint-attention model's layout facts
        self.highlights = list(highlights)
        self.token_columns = [list(c) for c in token_columns]
        self.context_len = int(context_len)
        self.settings = settings
        self.sigma_to_percent = sigma_to_percent
        self.aspect = aspect
        self.previous_override = previous_override
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._bias: dict[tuple[Any, ...], torch.Tensor] = {}
        self._joint_unit: dict[tuple[Any, ...], torch.Tensor] = {}
        self._joint_masks: dict[tuple[Any, ...], torch.Tensor] = {}
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
                got = region_stack(self.highlights, h, w, self.aspect, self.settings.softness)
                self._maps[(h, w)] = got
            return got

    def percent_at(self, sigma: torch.Tensor) -> float:
        return self.sigma_to_percent(float(sigma.reshape(-1).max()))

    def weight_at(self, sigma: torch.Tensor | None) -> float:
        return 0.0 if sigma is None else self.settings.weight_at(self.percent_at(sigma))

    def bias_for(self, h: int, w: int, n_keys: int, weight: float, device: torch.device, dtype: torch.dtype
                 ) -> torch.Tensor:
        """[h*w, n_keys] bias on ``device``. Cached per device and dtype, so a step's many attention calls
        transfer it once."""
        key = (h, w, n_keys, round(weight, 6), str(device), dtype)
        with self._lock:
            got = self._bias.get(key)
        if got is None:
            base = attention_bias(self.regions(h, w), self.token_columns, self.context_len, weight,
                                  self.settings.inside, self.settings.outside)
            got = tile_keys(base, n_keys).to(device, dtype)
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

    def joint_mask_for(self, layout: JointLayout, weight: float, rows: torch.Tensor, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """[B, N, N] additive mask of one joint-attention call without a caller's mask: the bias on the positive rows.

        The bias is linear in the weight, so the weight-1 bias goes to the device once per layout and each step
        scales it there; the batch mask is kept for the step's many calls (every block has the same layout).
        """
        flags = tuple(bool(r) for r in rows.tolist())
        key = (layout, round(weight, 6), flags, str(device), dtype)
        with self._lock:
            got = self._joint_masks.get(key)
        if got is not None:
            return got
        unit_key = (layout, str(device))
        with self._lock:
            unit = self._joint_unit.get(unit_key)
        if unit is None:
            unit = joint_bias(self.regions(*layout.grid), self.token_columns, self.context_len, layout, 1.0,
                              self.settings.inside, self.settings.outside).to(device)
            with self._lock:
                if len(self._joint_unit) > 4:
                    self._joint_unit.clear()
                self._joint_unit[unit_key] = unit
        bias = (unit * weight).to(dtype)
        got = bias[None] * rows.to(device=device, dtype=dtype)[:, None, None] if not all(flags) else bias[None]
        with self._lock:
            if len(self._joint_masks) > 4:  # a step's weight differs from the last one's: older masks are done
                self._joint_masks.clear()
            self._joint_masks[key] = got
        return got

    def _joint_call(self, func: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    mask: torch.Tensor | None, kwargs: dict[str, Any], to: dict[str, Any], skip: bool) -> Any:
        """One attention call of a joint-attention model: guided when it runs over the text and the image."""
        assert self.joint is not None
        args = (q, k, v, heads)
        n = q.shape[2] if skip else q.shape[1]
        nk = k.shape[2] if skip else k.shape[1]
        shape = to.get(SHAPE_KEY)
        if nk != n or shape is None:
            return self._next(func, args, kwargs)
        rows = cond_rows(q.shape[0], to.get("cond_or_uncond") or [0], device=q.device)
        if not bool(rows.any()):
            # Only negative prompts in this call: nothing to guide. SD3 and Flux batch conditionings of different
            # lengths in separate calls (CONDRegular), so this one's text need not fit the guide's prompt.
            return self._next(func, args, kwargs)
        layout = joint_layout(n, int(shape[2]), patch_grid((int(shape[0]), int(shape[1])), self.joint.patch),
                              self.joint.text_offset)
        if layout is None:  # e.g. SD3.5's image-only self-attention: no text to guide
            return self._next(func, args, kwargs)
        weight = self.weight_at(to.get("sigmas"))
        capture = to.get(CAPTURE_KEY)
        if weight == 0.0 and capture is None:
            return self._next(func, args, kwargs)
        full = mask
        if weight != 0.0:
            self.layers_seen += 1
            if mask is None:
                full = self.joint_mask_for(layout, weight, rows, q.device, q.dtype)
            else:
                bias = self.joint_mask_for(layout, weight, torch.ones(1, dtype=torch.bool), q.device, q.dtype)[0]
                full = combine_masks(bias, rows, mask)
        kwargs["mask"] = full
        if capture is not None:
            positions = phrase_key_positions(self.token_columns, self.context_len, layout)
            qh, kh, vh = (q, k, v) if skip else (split_heads(t, heads) for t in (q, k, v))
            out, probs = phrase_attention(qh, kh, vh, full, positions)
            capture.records.append(PhraseAttention(layout.grid, rows, joint_phrase_probs(probs, layout)))
            return out if bool(kwargs.get("skip_output_reshape", False)) else merge_heads(out)
        return self._next(func, args, kwargs)

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.pop("heads")  # MMDiT passes heads by name
        rest = args[4:]
        mask = kwargs.pop("mask", rest[0] if rest else None)
        args = (q, k, v, heads)
        kwargs["mask"] = mask
        to = kwargs.get("transformer_options") or {}
        skip = bool(kwargs.get("skip_reshape", False))
        if self.joint is not None:
            return self._joint_call(func, q, k, v, heads, mask, kwargs, to, skip)
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
        rows = cond_rows(q.shape[0], to.get("cond_or_uncond") or [0], device=q.device)
        bias = None
        if weight != 0.0:
            bias = self.bias_for(grid[0], grid[1], nk, weight, q.device, q.dtype)
            self.layers_seen += 1
        full = combine_masks(bias, rows, mask)
        kwargs["mask"] = full
        if capture is not None:
            return self._explicit_attention(q, k, v, heads, full, skip, bool(kwargs.get("skip_output_reshape", False)),
                                            grid, rows, capture)
        return self._next(func, args, kwargs)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                            mask: torch.Tensor | None, skip: bool, skip_out: bool, grid: tuple[int, int],
                            rows: torch.Tensor, capture: _Capture) -> torch.Tensor:
        """Differentiable attention that records each phrase's attention per pixel (refocusing), in the layout
        ComfyUI's attention functions take (skip_reshape: heads already split) and give back."""
        qh, kh, vh = (q, k, v) if skip else (split_heads(t, heads) for t in (q, k, v))
        out, probs = phrase_attention(qh, kh, vh, mask, self.token_columns)
        capture.records.append(PhraseAttention(grid, rows, probs))
        return out if skip_out else merge_heads(out)

    # -------------------------------------------------------------- joint models: the call's latent shape

    def apply_model_wrapper(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any,
                            control: Any, transformer_options: dict[str, Any], **kwargs: Any) -> Any:
        """APPLY_MODEL wrapper: tells the attention override the latent's (h, w) and the text length of this call
        (transformer_options is a fresh dict per batched model call, passed down to every block)."""
        if c_crossattn is not None and x.ndim == 4:
            transformer_options[SHAPE_KEY] = (int(x.shape[-2]), int(x.shape[-1]), int(c_crossattn.shape[1]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    # -------------------------------------------------------------- refocusing (PREDICT_NOISE wrapper)

    def refocus_active(self, sigma: torch.Tensor) -> bool:
        return self.settings.refocus_at(self.percent_at(sigma))

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
                loss = refocus_loss_over_layers(captured.records, self.regions)
                self.refocus_losses = [*self.refocus_losses[-63:], (sigma, it, float(loss.detach()))]
                (grad,) = torch.autograd.grad(loss, x_)
                x_ = refocus_step(x_, grad, s.refocus_step_size, sigma).detach().requires_grad_(True)
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
    if runtime.joint is not None:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, runtime.apply_model_wrapper)
    if runtime.settings.refocuses:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY,
                               runtime.predict_noise_wrapper)
    return m
