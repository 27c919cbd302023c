"""NoiseCLR glue that touches ComfyUI's objects: folders and images, the model as a differentiable eps(x, sigma,
context), the training run, and the sampling patch that applies directions (MODEL and GUIDER).

The algorithm (loss, training loop, checkpoint/resume, file format) lives in noisequery_core/directions/noiseclr.py; the
node classes are in nodes/directions_nodes.py; model families, noising and the training forward, shared with the
seed-invariant prompt, in nodes/_training.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import comfy.conds
import comfy.model_management
import comfy.samplers
import folder_paths
import numpy as np
import torch
from PIL import Image, ImageOps

from ..noisequery_core.directions.noiseclr import (
    Directions,
    TrainSettings,
    check_directions_name,
    checkpoint_path_for,
    load_directions,
    loss_summary,
    parse_names,
    save_directions,
    train_directions,
)
from ..noisequery_core.errors import NoiseCLRError
from ..noisequery_core.imaging import load_image, loss_curve_picture
from ..noisequery_core.training import data_fingerprint
from ..noisequery_core.work import CheckCancel, Progress, never_cancel, no_progress
from . import _host, _training
from ._glue import to_image, to_uint8
from ._training import FLUX, Family, context_dim_of, family_label, make_predict_noise, noising_of

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


# ------------------------------------------------------------------ model families (nodes/_training.py)

# Flux-dev trains with ComfyUI's default guidance (comfy.model_base.Flux.extra_conds), the value a plain
# CLIPTextEncode prompt samples with; applying uses whatever guidance the sampled prompt carries (FluxGuidance),
# the same for ∅ and the directions.
FLUX_TRAIN_GUIDANCE = _training.FLUX_DEFAULT_GUIDANCE


def family_of(model: Any) -> Family:
    """The NoiseCLR family of a MODEL, or NoiseCLRError naming why it cannot take directions."""
    return _training.family_of(model, "NoiseCLR", NoiseCLRError)


def check_supported(model: Any) -> Family:
    """The model's family, or NoiseCLRError saying why NoiseCLR cannot train or apply directions on it."""
    return _training.check_supported(model, "NoiseCLR", NoiseCLRError)


def model_identity(model: Any, name: str = "") -> dict[str, Any]:
    base = model.model
    out = {"name": name, "fingerprint": _host.model_fingerprint(model),
           "model_class": type(base.model_config).__name__, "context_dim": context_dim_of(model)}
    try:
        out["family"] = family_of(model).key
    except NoiseCLRError:
        pass  # identity only: check_supported says why the model is refused
    return out


def pooled_rest(model: Any, empty_pooled: torch.Tensor, resolution: int) -> torch.Tensor:
    """[1, R]: the part of the model's ``y`` that is not the pooled vector, as sampling at ``resolution`` pixels
    builds it (SDXL: size embeddings; SD3/Flux: R = 0)."""
    return _training.pooled_rest(model, empty_pooled, resolution, resolution, None, "NoiseCLR", NoiseCLRError)


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
    return empty_conditioning(clip)[0]


def empty_conditioning(clip: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([T0, D], [P] or None): the empty prompt's tokens and pooled vector, as CLIPTextEncode("") gives them."""
    return split_conditioning(clip.encode_from_tokens_scheduled(clip.tokenize("")), "the CLIP's empty prompt")


def split_conditioning(cond: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A one-entry CONDITIONING -> (tokens [T0, D], pooled [P] or None), on the CPU in float32."""
    try:
        tokens, extra = cond[0][0], cond[0][1]
        pooled = extra.get("pooled_output")
    except (TypeError, IndexError, KeyError, AttributeError) as exc:
        raise NoiseCLRError(f"NoiseCLR: {where} is not a CONDITIONING ([[tokens, {{...}}]]).") from exc
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[0] != 1:
        raise NoiseCLRError(f"NoiseCLR: {where} holds tokens of shape "
                            f"{tuple(getattr(tokens, 'shape', ()))}, expected one prompt [1, T, D].")
    if pooled is not None and (not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] != 1):
        raise NoiseCLRError(f"NoiseCLR: {where} holds a pooled vector of shape "
                            f"{tuple(getattr(pooled, 'shape', ()))}, expected [1, P].")
    return (tokens[0].detach().float().cpu(),
            pooled[0].detach().float().cpu() if pooled is not None else None)


def loss_plot(losses: Sequence[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """The loss curve (and its running mean) as an IMAGE [1, H, W, 3]."""
    return to_image([loss_curve_picture(losses, width=width, height=height)])


def run_training(model: Any, clip: Any, vae: Any, arrays: Sequence[np.ndarray], source: str, settings: TrainSettings,
                 out_path: Path, *, label: str = "", model_name: str = "", names: str = "", resume: bool = True,
                 progress: Progress = no_progress,
                 check_cancel: CheckCancel = never_cancel,
                 empty_cond: Any = None) -> tuple[Directions, str]:
    """Everything the train node and scripts/noiseclr_train.py do: encode, train, save. Returns (directions, report).

    ``progress`` and ``check_cancel`` follow the core's long-work contract (noisequery_core.work): the node
    passes a ``_host.NodeWork``'s; a stop raises out of here after the checkpoint is written.
    ``empty_cond``: the empty prompt's CONDITIONING, used instead of encoding "" with ``clip`` (which may then
    be None); for text encoders one cannot load, or to pick the encoders' empty prompt by hand.
    """
    family = check_supported(model)
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

    if empty_cond is not None:
        empty, empty_pooled = split_conditioning(empty_cond, "empty_conditioning")
    elif clip is not None:
        empty, empty_pooled = empty_conditioning(clip)
    else:
        raise NoiseCLRError("NoiseCLR Train Directions: connect the model's CLIP (it encodes the empty prompt the "
                            "directions start from), or an empty prompt's CONDITIONING to empty_conditioning.")
    dim = context_dim_of(model)
    if empty.shape[1] != dim:
        raise NoiseCLRError(f"the empty prompt's encoding is {empty.shape[1]} wide but the {family.label} model's "
                            f"text conditioning expects {dim}; connect the CLIP that belongs to this checkpoint.")
    if family.pooled and empty_pooled is None:
        raise NoiseCLRError(f"the empty prompt's encoding has no pooled vector ('pooled_output'), which {family.label} "
                            f"models also take; connect the CLIP that belongs to this checkpoint.")
    if not family.pooled:
        empty_pooled = None  # SD1.x/SD2.x take tokens only; a pooled vector from the CLIP would not reach them
    resolution = int(arrays[0].shape[0])
    y_rest = pooled_rest(model, empty_pooled, resolution) if empty_pooled is not None else None
    guidance = FLUX_TRAIN_GUIDANCE if family is FLUX and _training.unet_config(model).get("guidance_embed") else None
    if guidance is not None:
        base_model["guidance"] = guidance
    ckpt = checkpoint_path_for(out_path)
    device = comfy.model_management.get_torch_device()
    # ComfyUI runs nodes under torch.inference_mode(); training needs autograd, on normal tensors.
    encoded = encode_images(vae, model, arrays)  # no gradient needed: encoded once, as the node runs
    with torch.inference_mode(False), torch.enable_grad():
        latents = encoded.clone().to(device)
        predict, sigmas = make_predict_noise(model, y_rest=y_rest.clone().to(device) if y_rest is not None else None,
                                             guidance=guidance)
        d = train_directions(latents, empty.clone(), predict, sigmas, settings, checkpoint_path=ckpt, resume=resume,
                             base_model=base_model, data=data, names=name_list, progress=progress,
                             check_cancel=check_cancel, device=device,
                             empty_pooled=empty_pooled.clone() if empty_pooled is not None else None,
                             add_noise=noising_of(model), family=family.key)
        del predict  # drops the weight clones
    save_directions(out_path, d)
    pooled = f" + a pooled part of {d.pooled_dim}" if d.pooled_dim else ""
    report = (f"{label or out_path.name}: {d.count} directions x {d.token_count} tokens x {d.context_dim}{pooled} "
              f"({family.label}) trained on {source} "
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
    Flow models (SD3, Flux): the same sum in denoised space is scale·Δv, the edit to the velocity.

    Pooled families: ``empty_pooled`` [P] and ``pooled`` (one [P] per item) replace the first P entries of the
    sampled prompt's ``y`` (SDXL: the rest is its size embeddings, kept; SD3/Flux: all of it). ``joint``: the
    tokens are passed as CONDRegular, the way ComfyUI batches SD3/Flux conditioning.
    """

    def __init__(self, empty: torch.Tensor, items: Sequence[tuple[torch.Tensor, float, float, float]],
                 batched: bool = True, *, empty_pooled: torch.Tensor | None = None,
                 pooled: Sequence[torch.Tensor] | None = None, joint: bool = False):
        if (empty_pooled is None) != (pooled is None) or (pooled is not None and len(pooled) != len(items)):
            raise NoiseCLRError("DirectionGuidance: give empty_pooled and one pooled vector per direction, or neither.")
        self.empty = empty.unsqueeze(0).float()  # [1, T0, D]
        self.empty_pooled = empty_pooled.unsqueeze(0).float() if empty_pooled is not None else None  # [1, P]
        kept = [i for i, (_, scale, _, _) in enumerate(items) if scale != 0.0]
        self.items = [(items[i][0].unsqueeze(0).float(), float(items[i][1]), float(items[i][2]), float(items[i][3]))
                      for i in kept]
        self.pooled = [pooled[i].unsqueeze(0).float() for i in kept] if pooled is not None else None
        self.cond_class = comfy.conds.CONDRegular if joint else comfy.conds.CONDCrossAttn
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

    def _cond(self, tokens: torch.Tensor, i: int, extra: dict[str, Any], device: torch.device,
              pooled: torch.Tensor | None = None) -> dict[str, Any]:
        model_conds = dict(extra)
        model_conds["c_crossattn"] = self.cond_class(tokens.to(device))
        if pooled is not None:
            y = extra.get("y")
            if y is None:
                raise NoiseCLRError("NoiseCLR: the prompt being sampled carries no pooled vector ('y'), which these "
                                    "directions' pooled part replaces; sample with a prompt from this model's CLIP.")
            rest = y.cond[:, pooled.shape[1]:]
            y_new = torch.cat([pooled.to(rest).expand(rest.shape[0], -1), rest], dim=1)
            model_conds["y"] = comfy.conds.CONDRegular(y_new)
        return {"model_conds": model_conds, "uuid": self._uuids[i]}

    def delta(self, base: Any, x: torch.Tensor, sigma: torch.Tensor, model_options: dict[str, Any],
              template: Sequence[dict[str, Any]] | None) -> torch.Tensor | None:
        on = self.active(base.model_sampling, float(sigma.max()))
        if not on:
            return None
        # Other model inputs (e.g. an inpainting model's c_concat) come from the positive cond, the same for ∅
        # and the directions, so they cancel in the difference.
        extra = {k: v for k, v in ((template or [{}])[0].get("model_conds") or {}).items() if k != "c_crossattn"}
        conds = [[self._cond(self.empty, 0, extra, x.device, self.empty_pooled)]]
        conds += [[self._cond(self.items[i][0], i + 1, extra, x.device, self.pooled[i] if self.pooled else None)]
                  for i in on]
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


def empty_prompt_conditioning(d: Directions) -> list[list[Any]]:
    """The file's ∅ as a CONDITIONING (tokens, and the pooled vector where the family has one)."""
    extra: dict[str, Any] = {}
    if d.empty_pooled is not None:
        extra["pooled_output"] = d.empty_pooled.unsqueeze(0).clone()
    return [[d.empty.unsqueeze(0).clone(), extra]]


def apply_directions(model: Any, d: Directions, slots: Sequence[tuple[int, float, float, float]],
                     batched: bool = True) -> tuple[Any, DirectionGuidance, list[str]]:
    """(patched clone of model, the guidance, report lines). Nothing is patched when no slot acts.

    Directions apply only to the family they were trained on (NoiseCLRError naming both families otherwise).
    """
    family = check_supported(model)
    if d.family != family.key:
        raise NoiseCLRError(f"these directions were trained on the {family_label(d.family)} family "
                            f"({d.base_model.get('model_class', '?')}), but the connected model is {family.label} "
                            f"({family.key!r}, {type(model.model.model_config).__name__}). Directions live in one "
                            f"family's conditioning space; train a set on this model with NoiseCLR Train Directions.")
    dim = context_dim_of(model)
    if dim != d.context_dim:
        raise NoiseCLRError(f"these directions are {d.context_dim} wide (trained on {d.base_model.get('model_class', '?')}) "
                            f"but the model's text conditioning takes {dim}: they belong to another model of the "
                            f"{family.label} family (e.g. SD2.x directions on SD1.x).")
    if family.pooled and d.pooled is None:
        raise NoiseCLRError(f"these directions have no pooled part, which {family.label} models need; the file is "
                            f"damaged or was not trained by NoiseQuery. Train them again on this model.")
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
    pooled = [d.pooled[i] for i, _, _, _ in used] if family.pooled and d.pooled is not None else None
    guidance = DirectionGuidance(d.empty, [(d.directions[i], scale, start, end) for i, scale, start, end in used],
                                 batched=batched, empty_pooled=d.empty_pooled if pooled is not None else None,
                                 pooled=pooled, joint=family.joint)
    patched = model.clone()
    if guidance.items:
        patched.set_model_sampler_post_cfg_function(guidance)
    for i, scale, start, end in used:
        state = "off (scale 0)" if scale == 0 else f"scale {scale:+.2f}, steps {start:.0%}..{end:.0%}"
        lines.append(f"#{i} {d.names[i]}: {state}")
    if not used:
        lines.append("no direction selected (every slot index is -1): the model is unchanged.")
    return patched, guidance, lines
