"""NoiseCLR glue that touches ComfyUI's objects: folders and images, the model as a differentiable eps(x, sigma,
context), the training run, and the sampling patch that applies directions (MODEL and GUIDER).

The algorithm (loss, training loop, checkpoint/resume, file format) lives in noisequery_core/directions/noiseclr.py; the
node classes are in nodes/directions_nodes.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import comfy.conds
import comfy.model_base
import comfy.model_management
import comfy.samplers
import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ..noisequery_core.directions.noiseclr import (
    Directions,
    TrainSettings,
    check_directions_name,
    checkpoint_path_for,
    data_fingerprint,
    load_directions,
    loss_summary,
    parse_names,
    save_directions,
    train_directions,
)
from ..noisequery_core.errors import NoiseCLRError
from ..noisequery_core.imaging import load_image
from ..noisequery_core.work import CheckCancel, Progress, never_cancel, no_progress
from . import _host
from ._glue import to_image, to_uint8

log = logging.getLogger("noisequery")

FOLDER = "noiseclr_directions"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SLOTS = 4  # direction slots on the apply node (each: index, scale, start, end)
MAX_INDEX = 255


# ------------------------------------------------------------------ folders and files


def register_folder() -> None:
    """models/noiseclr_directions, registered once; extra_model_paths.yaml entries stay first."""
    _host.register_folder(FOLDER)


def directions_files() -> list[str]:
    """Finished directions files: every ``.safetensors``. Checkpoints end in CHECKPOINT_SUFFIX
    (``.safetensors.checkpoint``), which no directions file can, so none is hidden by mistake."""
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]


def _inside(root: str, path: str) -> bool:
    root_r, path_r = os.path.realpath(root), os.path.realpath(path)
    return path_r == root_r or path_r.startswith(root_r + os.sep)


def directions_path(name: str) -> Path:
    """An existing directions file by its name in the folder list; never outside the folder."""
    full = folder_paths.get_full_path(FOLDER, name)
    if full is None:
        raise NoiseCLRError(f"directions file {name!r} not found in models/{FOLDER} "
                            f"({', '.join(folder_paths.get_folder_paths(FOLDER))}). Train one with NoiseCLR Train Directions.")
    if not any(_inside(root, full) for root in folder_paths.get_folder_paths(FOLDER)):
        raise NoiseCLRError(f"directions file {name!r} resolves outside models/{FOLDER}.")
    return Path(full)


def output_path(name: str) -> Path:
    """Where the train node writes directions ``name`` (first folder of models/noiseclr_directions)."""
    clean = check_directions_name(name)
    if not clean or clean.startswith(("/", "\\")) or ".." in Path(clean).parts or ":" in clean:
        raise NoiseCLRError(f"name {name!r}: use a plain file name like 'faces_8' (sub-folders with '/' are fine, "
                            f"'..' and absolute paths are not).")
    root = folder_paths.get_folder_paths(FOLDER)[0]
    path = os.path.join(root, clean + ".safetensors")
    if not _inside(root, path):
        raise NoiseCLRError(f"name {name!r} leads outside models/{FOLDER}.")
    return Path(path)


def folder_images(folder: str) -> list[Path]:
    """Image files of a folder under ComfyUI's input directory (sorted by name, not recursive)."""
    base = folder_paths.get_input_directory()
    path = os.path.join(base, folder.strip())
    if os.path.isabs(folder.strip()) or not _inside(base, path):
        raise NoiseCLRError(f"image_folder {folder!r} must be a folder inside ComfyUI's input directory ({base}), "
                            f"e.g. 'faces'.")
    if not os.path.isdir(path):
        raise NoiseCLRError(f"image_folder {folder!r}: {path} is not a folder. Put your training images in "
                            f"{base}/<folder> and type that folder's name.")
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise NoiseCLRError(f"image_folder {folder!r}: no images ({', '.join(IMAGE_EXTS)}) in {path}.")
    return files


def _square(im: Image.Image, size: int) -> np.ndarray:
    """Scale the shorter side to ``size`` and crop the centre: uint8 [size, size, 3]."""
    fitted = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8)


def gather_images(folder: str, images: torch.Tensor | None, resolution: int) -> tuple[list[np.ndarray], str]:
    """Training images as uint8 arrays (folder first, then the IMAGE batch) and a word on where they came from."""
    arrays: list[np.ndarray] = []
    sources = []
    if folder.strip():
        files = folder_images(folder)
        for f in files:
            arrays.append(_square(load_image(f), resolution))  # upright, 8-bit by the file's real range
        sources.append(f"{len(files)} images from input/{folder.strip()}")
    if images is not None:
        arr = to_uint8(images)
        for a in arr:
            arrays.append(_square(Image.fromarray(a), resolution))
        sources.append(f"{len(arr)} images from the IMAGE input")
    if not arrays:
        raise NoiseCLRError("NoiseCLR Train Directions: no images. Type a folder under ComfyUI's input directory in "
                            "image_folder, or connect an IMAGE batch to images.")
    return arrays, ", ".join(sources)


# ------------------------------------------------------------------ the model as a differentiable eps(x, σ, context)


def model_identity(model: Any, name: str = "") -> dict[str, Any]:
    base = model.model
    return {"name": name, "fingerprint": _host.model_fingerprint(model),
            "model_class": type(base.model_config).__name__, "context_dim": context_dim_of(model)}


def context_dim_of(model: Any) -> int | None:
    dim = (getattr(model.model.model_config, "unet_config", {}) or {}).get("context_dim")
    return int(dim) if dim else None


def check_supported(model: Any) -> None:
    """NoiseCLR here is for UNets conditioned by cross-attention only (SD1.x, SD2.x)."""
    base = model.model
    kind = type(base.model_config).__name__
    if getattr(base, "adm_channels", 0):
        raise NoiseCLRError(
            f"NoiseCLR: {kind} models also take a pooled text vector (ADM/'y' input, e.g. SDXL); directions here are "
            f"cross-attention tokens only, so this model is not supported yet. Use an SD1.x or SD2.x checkpoint.")
    if context_dim_of(model) is None:
        raise NoiseCLRError(f"NoiseCLR: {kind} has no cross-attention context (context_dim); it cannot take directions.")
    if base.model_type not in (comfy.model_base.ModelType.EPS, comfy.model_base.ModelType.V_PREDICTION):
        raise NoiseCLRError(f"NoiseCLR: {kind} predicts {base.model_type.name}; only eps and v-prediction UNets "
                            f"(SD1.x, SD2.x) are supported.")


class _Forward(torch.nn.Module):
    """Holds the BaseModel as a submodule so torch.func.functional_call can swap its weights."""

    def __init__(self, base: Any):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.base.apply_model(x, sigma, c_crossattn=context)


def make_predict_noise(model: Any) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """(predict_noise, sigmas) for the core's training loop. Call inside inference_mode(False).

    ComfyUI loads weights under torch.inference_mode, and inference tensors cannot be saved for
    backward; so the forward runs on clones of the UNet's weights (torch.func.functional_call),
    leaving the real weights untouched (the host test checks they stay bit-identical). Costs one
    extra copy of the UNet in memory while training. Weight patches (LoRAs) are already merged
    into the weights by load_models_gpu, so a LoRA-patched MODEL trains on the patched weights.
    """
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    base = model.model
    fwd = _Forward(base)
    params = {f"base.diffusion_model.{k}": v.detach().clone() for k, v in base.diffusion_model.named_parameters()}
    params.update({f"base.diffusion_model.{k}": v.detach().clone() for k, v in base.diffusion_model.named_buffers()})
    sigmas = base.model_sampling.sigmas.detach().clone().float()

    def predict_noise(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        denoised = torch.func.functional_call(fwd, params, (x, sigma, context), strict=False)
        # x = x0 + σ·ε in ComfyUI's sampling space, for eps and v-prediction models alike.
        return (x - denoised) / sigma.view(-1, *([1] * (x.dim() - 1)))

    return predict_noise, sigmas


def encode_images(vae: Any, model: Any, arrays: Sequence[np.ndarray], batch: int = 8) -> torch.Tensor:
    """VAE-encode uint8 images into the model's latent space (process_latent_in applied)."""
    with torch.no_grad():
        return _encode(vae, model, arrays, batch)


def _encode(vae: Any, model: Any, arrays: Sequence[np.ndarray], batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(arrays), batch):
        px = to_image(arrays[i : i + batch])
        out.append(vae.encode(px).float())
    lat = torch.cat(out)
    return model.model.process_latent_in(lat)


def empty_encoding(clip: Any) -> torch.Tensor:
    """[T0, D]: the encoding of the empty prompt (∅), as CLIPTextEncode("") gives it."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return cond[0][0][0].detach().float().cpu()


def loss_plot(losses: Sequence[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss curve (and its running mean) as an IMAGE [1, H, W, 3]."""
    im = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(im)
    if len(losses) >= 2:
        arr = np.asarray(losses, dtype=np.float64)
        w = max(1, len(arr) // 20)
        smooth = np.convolve(arr, np.ones(w) / w, mode="valid")
        lo, hi = float(arr.min()), float(arr.max())
        span = hi - lo or 1.0

        def pts(values: np.ndarray, offset: int) -> list[tuple[float, float]]:
            n = len(arr) - 1
            return [(8 + (i + offset) / n * (width - 16), height - 20 - (v - lo) / span * (height - 40))
                    for i, v in enumerate(values)]

        draw.line(pts(arr, 0), fill=(90, 110, 160), width=1)
        draw.line(pts(smooth, w - 1), fill=(250, 190, 60), width=2)
        draw.text((8, 4), f"loss {arr[0]:.3f} -> {arr[-1]:.3f} (max {hi:.3f}, min {lo:.3f})", fill=(230, 230, 230))
    else:
        draw.text((8, 4), "fewer than 2 iterations", fill=(230, 230, 230))
    return to_image([im])


def run_training(model: Any, clip: Any, vae: Any, arrays: Sequence[np.ndarray], source: str, settings: TrainSettings,
                 out_path: Path, *, label: str = "", model_name: str = "", names: str = "", resume: bool = True,
                 progress: Progress = no_progress,
                 check_cancel: CheckCancel = never_cancel) -> tuple[Directions, str]:
    """Everything the train node and scripts/noiseclr_train.py do: encode, train, save. Returns (directions, report).

    ``progress`` and ``check_cancel`` follow the core's long-work contract (noisequery_core.work): the node
    passes a ``_host.NodeWork``'s; a stop raises out of here after the checkpoint is written.
    """
    check_supported(model)
    base_model = model_identity(model, model_name)
    data = {"images": len(arrays), "fingerprint": data_fingerprint(arrays), "resolution": int(arrays[0].shape[0]),
            "source": source}
    name_map = parse_names(names, settings.num_directions) if names.strip() else {}
    name_list = [name_map.get(i, f"direction {i}") for i in range(settings.num_directions)]
    settings.validate(image_count=len(arrays))

    if resume and out_path.is_file():
        done = load_directions(out_path)
        if (not settings.same_run(done.settings) and done.iterations_done == settings.iterations
                and done.base_model.get("fingerprint") == base_model["fingerprint"]
                and done.data.get("fingerprint") == data["fingerprint"]):
            return done, f"{label or out_path.name}: already trained with these settings, model and images (nothing to do).\n" \
                         f"{loss_summary(done.loss_history)}"

    empty = empty_encoding(clip)
    dim = context_dim_of(model)
    if empty.shape[1] != dim:
        raise NoiseCLRError(f"the CLIP's encoding is {empty.shape[1]} wide but the model's cross-attention expects {dim}; "
                            f"connect the CLIP that belongs to this checkpoint.")
    ckpt = checkpoint_path_for(out_path)
    device = comfy.model_management.get_torch_device()
    # ComfyUI runs nodes under torch.inference_mode(); training needs autograd, on normal tensors.
    encoded = encode_images(vae, model, arrays)  # no gradient needed: encoded once, as the node runs
    with torch.inference_mode(False), torch.enable_grad():
        latents = encoded.clone().to(device)
        predict, sigmas = make_predict_noise(model)
        d = train_directions(latents, empty.clone(), predict, sigmas, settings, checkpoint_path=ckpt, resume=resume,
                             base_model=base_model, data=data, names=name_list, progress=progress,
                             check_cancel=check_cancel, device=device)
        del predict  # drops the weight clones
    save_directions(out_path, d)
    report = (f"{label or out_path.name}: {d.count} directions x {d.token_count} tokens x {d.context_dim} trained on {source} "
              f"at {data['resolution']}px for {d.iterations_done} iterations\n{loss_summary(d.loss_history)}\n"
              f"checkpoint (resume / extend iterations): {ckpt.name}\nbase model: {base_model['model_class']} "
              f"{base_model['name'] or ''} fingerprint {base_model['fingerprint']}")
    return d, report


# ------------------------------------------------------------------ applying directions while sampling


class DirectionGuidance:
    """A post-CFG function adding Σ scale_i·(ε(x, d_i) − ε(x, ∅)) for the directions active at this step.

    Works in denoised space: with x = x0 + σ·ε, denoised(d) − denoised(∅) = −σ·(ε(d) − ε(∅)), so adding
    scale·(denoised_d − denoised_∅) to the CFG result is exactly adding scale·Δε to the noise prediction,
    for eps and v models. ∅ and every active direction go to the UNet in ONE calc_cond_batch call, which
    batches them; ∅ is the empty prompt stored in the file, so neither the negative prompt nor cfg=1's
    skipped uncond pass matter. Directions outside their start..end range, or at scale 0, are not run.
    """

    def __init__(self, empty: torch.Tensor, items: Sequence[tuple[torch.Tensor, float, float, float]],
                 batched: bool = True):
        self.empty = empty.unsqueeze(0).float()  # [1, T0, D]
        self.items = [(tok.unsqueeze(0).float(), float(scale), float(start), float(end))
                      for tok, scale, start, end in items if scale != 0.0]
        self.batched = batched  # False runs one UNet call per direction (the reference cost; for bench only)
        self._uuids = [uuid.uuid4() for _ in range(len(self.items) + 1)]
        self.calls = 0

    def active(self, model_sampling: Any, sigma: float) -> list[int]:
        out = []
        for i, (_, _, start, end) in enumerate(self.items):
            hi = float(model_sampling.percent_to_sigma(start))
            lo = float(model_sampling.percent_to_sigma(end))
            if lo <= sigma <= hi:
                out.append(i)
        return out

    def _cond(self, tokens: torch.Tensor, i: int, extra: dict[str, Any], device: torch.device) -> dict[str, Any]:
        model_conds = dict(extra)
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(tokens.to(device))
        return {"model_conds": model_conds, "uuid": self._uuids[i]}

    def delta(self, base: Any, x: torch.Tensor, sigma: torch.Tensor, model_options: dict[str, Any],
              template: Sequence[dict[str, Any]] | None) -> torch.Tensor | None:
        on = self.active(base.model_sampling, float(sigma.max()))
        if not on:
            return None
        # Other model inputs (e.g. an inpainting model's c_concat) come from the positive cond, the same for ∅
        # and the directions, so they cancel in the difference.
        extra = {k: v for k, v in ((template or [{}])[0].get("model_conds") or {}).items() if k != "c_crossattn"}
        conds = [[self._cond(self.empty, 0, extra, x.device)]]
        conds += [[self._cond(self.items[i][0], i + 1, extra, x.device)] for i in on]
        self.calls += 1
        if self.batched:
            outs = comfy.samplers.calc_cond_batch(base, conds, x, sigma, model_options)
        else:
            outs = [comfy.samplers.calc_cond_batch(base, [c], x, sigma, model_options)[0] for c in conds]
        total = torch.zeros_like(outs[0])
        for j, i in enumerate(on):
            total += self.items[i][1] * (outs[j + 1] - outs[0])
        return total

    def __call__(self, args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        d = self.delta(args["model"], args["input"], args["sigma"], args["model_options"], args.get("cond"))
        return denoised if d is None else denoised + d


def parse_slots(d: Directions, slots: Sequence[tuple[int, float, float, float]]) -> list[tuple[int, float, float, float]]:
    """Used slots (index >= 0), checked against the file."""
    used = []
    for n, (index, scale, start, end) in enumerate(slots, start=1):
        if index < 0:
            continue
        if index >= d.count:
            raise NoiseCLRError(f"slot {n}: direction {index} does not exist; the file has directions 0..{d.count - 1}.")
        if start > end:
            raise NoiseCLRError(f"slot {n}: start {start} is after end {end}; start..end is the part of sampling "
                                f"(0 = first step, 1 = last) where the direction acts.")
        used.append((int(index), float(scale), float(start), float(end)))
    return used


def apply_directions(model: Any, d: Directions, slots: Sequence[tuple[int, float, float, float]],
                     batched: bool = True) -> tuple[Any, DirectionGuidance, list[str]]:
    """(patched clone of model, the guidance, report lines). Nothing is patched when no slot acts."""
    check_supported(model)
    dim = context_dim_of(model)
    if dim != d.context_dim:
        raise NoiseCLRError(f"these directions are {d.context_dim} wide (trained on {d.base_model.get('model_class', '?')}) "
                            f"but the model's cross-attention takes {dim}: they belong to another model family.")
    used = parse_slots(d, slots)
    lines = []
    fp = d.base_model.get("fingerprint")
    if fp:
        got = _host.model_fingerprint(model)
        if got != fp:
            msg = (f"warning: these directions were trained on {d.base_model.get('model_class', '?')} "
                   f"{d.base_model.get('name') or ''} (fingerprint {fp}); the connected model's fingerprint is {got}. "
                   f"They may do something else, or little, on this model.")
            log.warning("NoiseCLR: %s", msg)
            lines.append(msg)
    guidance = DirectionGuidance(d.empty, [(d.directions[i], scale, start, end) for i, scale, start, end in used],
                                 batched=batched)
    patched = model.clone()
    if guidance.items:
        patched.set_model_sampler_post_cfg_function(guidance)
    for i, scale, start, end in used:
        state = "off (scale 0)" if scale == 0 else f"scale {scale:+.2f}, steps {start:.0%}..{end:.0%}"
        lines.append(f"#{i} {d.names[i]}: {state}")
    if not used:
        lines.append("no direction selected (every slot index is -1): the model is unchanged.")
    return patched, guidance, lines
