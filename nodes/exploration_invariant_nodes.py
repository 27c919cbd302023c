"""Seed-invariant prompt nodes: tune a prompt's tokens on a liked image so other seeds land near it; load the result.

Thin glue over noisequery_core/exploration/invariant.py (loss, optimisation, resume, file format). Files live in
models/noisequery_embeddings; a file is refused on any model but the one it was tuned through. Families (SD1.x/SD2.x,
SDXL, SD3, Flux.1), their noising and the differentiable forward are nodes/_training.py's, as for NoiseCLR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..noisequery_core.exploration.invariant import (
    Embedding,
    InvariantSettings,
    SeedInvariantError,
    check_embedding_name,
    check_fits_model,
    checkpoint_for,
    held_out_summary,
    load_embedding,
    loss_curve,
    optimise_prompt,
    same_origin,
    save_embedding,
    scalar_options,
)
from ..noisequery_core.training import data_fingerprint
from ..noisequery_core.work import CheckCancel, Progress, never_cancel, no_progress
from . import _host, _training
from ._glue import SEED_MAX, to_image, to_uint8
from ._training import FAMILIES, FLUX, Family, context_dim_of, make_predict_noise, noising_of
from ._validate import numbers_problem, require_numbers

log = logging.getLogger("noisequery")

FOLDER = _host.EMBEDDING_FOLDER


# ------------------------------------------------------------------ files


def embedding_files() -> list[str]:
    """Finished embeddings: every ``.safetensors`` (checkpoints end in ``.safetensors.checkpoint``)."""
    try:
        return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(".safetensors")]
    except Exception as exc:  # folder not registered (should not happen): offer none, say why in the log
        log.warning("cannot list %s: %s", FOLDER, exc)
        return []


def _inside(root: str, path: str) -> bool:
    root_r, path_r = os.path.realpath(root), os.path.realpath(path)
    return path_r == root_r or path_r.startswith(root_r + os.sep)


def embedding_path(name: str) -> Path:
    """An existing embedding by its name in the folder list; never a file outside the folder (links included)."""
    roots = folder_paths.get_folder_paths(FOLDER)
    full = folder_paths.get_full_path(FOLDER, name)
    if full is None or not name.endswith(".safetensors"):
        raise SeedInvariantError(f"embedding {name!r} not found in models/{FOLDER} ({', '.join(roots)}). Make one "
                                 f"with NoiseQuery Seed-Invariant Prompt, or pick a listed file.")
    if not any(_inside(root, full) for root in roots):
        raise SeedInvariantError(f"embedding {name!r} resolves outside models/{FOLDER} ({os.path.realpath(full)}); "
                                 f"only files inside the folder are read.")
    return Path(full)


def output_path(name: str) -> Path:
    """Where the node writes embedding ``name`` (the first folder of models/noisequery_embeddings)."""
    clean = check_embedding_name(name)
    root = folder_paths.get_folder_paths(FOLDER)[0]
    path = os.path.join(root, clean + ".safetensors")
    if not _inside(root, path):
        raise SeedInvariantError(f"name {name!r} leads outside models/{FOLDER} ({root}); use a plain file name.")
    return Path(path)


# ------------------------------------------------------------------ the model


WHO = "Seed-invariant prompt"
FAMILY_LABELS = {k: f.label for k, f in FAMILIES.items()}


def _identity(model: Any, name: str) -> dict[str, Any]:
    return {"name": name, "fingerprint": _host.model_fingerprint(model),
            "model_class": type(model.model.model_config).__name__, "context_dim": context_dim_of(model)}


def check_model(model: Any) -> Family:
    """The model's family (SD1.x/SD2.x eps or v, SDXL, SD3, Flux.1 dev/schnell), or SeedInvariantError saying why
    its conditioning cannot be tuned (Flux2, Chroma, Fill/control Flux, other DiTs, unCLIP: as NoiseCLR refuses)."""
    return _training.check_supported(model, WHO, SeedInvariantError)


def prompt_tokens(conditioning: Any, dim: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The one prompt's tokens [T, D] and its options dict, or SeedInvariantError saying what to connect."""
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        n = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise SeedInvariantError(f"conditioning: {n} entries; connect one prompt's CONDITIONING (a CLIPTextEncode), "
                                 f"not a ConditioningCombine or area/timestep set.")
    tokens, opts = conditioning[0][0], conditioning[0][1]
    if tokens.dim() != 3 or tokens.shape[0] != 1:
        raise SeedInvariantError(f"conditioning: tokens of shape {tuple(tokens.shape)}; expected [1, T, D] from one "
                                 f"prompt.")
    if dim is not None and tokens.shape[2] != dim:
        raise SeedInvariantError(f"conditioning is {tokens.shape[2]} wide but the model's text conditioning takes "
                                 f"{dim}: connect the CLIP of this checkpoint.")
    return tokens[0].detach().float().cpu(), dict(opts)


def prompt_pooled(options: dict[str, Any], family: Family) -> torch.Tensor | None:
    """The prompt's pooled vector [P] for a pooled family (None for SD1.x/SD2.x), or SeedInvariantError."""
    if not family.pooled:
        return None  # SD1.x/SD2.x take tokens only; a pooled vector from the CLIP would not reach them
    pooled = options.get("pooled_output")
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] != 1:
        raise SeedInvariantError(f"conditioning: no pooled vector ('pooled_output' [1, P]), which {family.label} "
                                 f"models also take; connect a CLIPTextEncode of the CLIP that belongs to this "
                                 f"checkpoint.")
    return pooled[0].detach().float().cpu()


def _prompt_hash(conditioning: Any, pooled: torch.Tensor | None, options: dict[str, Any]) -> str:
    """The prompt's identity for resume: its tokens (SD1.x/SD2.x: only them, as files made before families), plus
    the pooled vector and the scalar options (guidance, sizes) where the family takes them."""
    base = _host.conditioning_fingerprint(conditioning)
    if pooled is None:
        return base
    h = hashlib.sha256(base.encode())
    h.update(pooled.numpy().tobytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:16]


def encode_liked(vae: Any, model: Any, images: torch.Tensor) -> torch.Tensor:
    """VAE-encode the liked image(s) into the model's latent space (process_latent_in applied)."""
    with torch.no_grad():
        return model.model.process_latent_in(vae.encode(images[..., :3]).float())


def run_optimisation(model: Any, vae: Any, conditioning: Any, images: torch.Tensor, settings: InvariantSettings,
                     out_path: Path, *, label: str = "", model_name: str = "", prompt_text: str = "",
                     resume: bool = True, progress: Progress = no_progress,
                     check_cancel: CheckCancel = never_cancel) -> tuple[Embedding, str]:
    """Encode, optimise (resuming), save. Returns (embedding, report). The node and bench/bench_invariant.py use it."""
    family = check_model(model)
    settings.validate()
    dim = context_dim_of(model)
    tokens, opts = prompt_tokens(conditioning, dim)
    pooled = prompt_pooled(opts, family)
    options = scalar_options(opts)
    if images is None or images.dim() != 4 or images.shape[0] < 1:
        raise SeedInvariantError("image: connect the liked image (an IMAGE, one or a few of the same size).")
    base_model = _identity(model, model_name)
    guidance = None
    if family is FLUX and _training.unet_config(model).get("guidance_embed"):
        # Flux-dev samples with the guidance its prompt carries (FluxGuidance), ComfyUI's default when none
        guidance = float(options.get("guidance", _training.FLUX_DEFAULT_GUIDANCE))
        base_model["guidance"] = guidance
    arrays = to_uint8(images)
    width, height = int(arrays.shape[2]), int(arrays.shape[1])
    data: dict[str, Any] = {"images": len(arrays), "fingerprint": data_fingerprint(list(arrays)), "size": [width, height]}
    prompt = {"hash": _prompt_hash(conditioning, pooled, options), "text": prompt_text}
    label = label or out_path.name
    if resume and out_path.is_file():
        done = load_embedding(out_path)
        template = Embedding(tokens=tokens, original=tokens, base_model=base_model, prompt=prompt, settings=settings,
                             data=data, pooled=pooled, original_pooled=pooled, family=family.key, options=options)
        if not same_origin(template, done) and done.iterations_done == settings.iterations:
            return done, f"{label}: already made with these settings, model, prompt and image(s) (nothing to do).\n" \
                         f"{held_out_summary(done)}"
    device = comfy.model_management.get_torch_device()
    encoded = encode_liked(vae, model, images)
    # SDXL: the size embeddings sampling will add to this prompt's pooled vector (its options, else the image size)
    y_rest = _training.pooled_rest(model, pooled, width, height, opts, WHO, SeedInvariantError) \
        if pooled is not None else None
    # ComfyUI runs nodes under torch.inference_mode(); the optimisation needs autograd on normal tensors.
    with torch.inference_mode(False), torch.enable_grad():
        latents = encoded.clone().to(device)
        predict, sigmas = make_predict_noise(model, y_rest=y_rest.clone().to(device) if y_rest is not None else None,
                                             guidance=guidance)
        e = optimise_prompt(latents, tokens.clone(), predict, sigmas, settings, checkpoint_path=checkpoint_for(out_path),
                            resume=resume, base_model=base_model, prompt=prompt, data=data, progress=progress,
                            check_cancel=check_cancel, device=device,
                            pooled=pooled.clone() if pooled is not None else None, add_noise=noising_of(model),
                            family=family.key, options=options)
        del predict  # drops the weight clones
    save_embedding(out_path, e)
    tuned = f" + a pooled vector of {e.pooled_dim}" if e.pooled_dim else ""
    report = (f"{label}: {e.tokens.shape[0]} tokens x {e.context_dim}{tuned} ({family.label}) tuned for "
              f"{e.iterations_done} iterations on "
              f"{data['images']} liked image(s) at {width}x{height}\n{held_out_summary(e)}\n"
              f"training loss {e.loss_history[0]:.4f} -> {e.loss_history[-1]:.4f}; checkpoint (resume / extend): "
              f"{checkpoint_for(out_path).name}\nbase model: {base_model['model_class']} {model_name} fingerprint "
              f"{base_model['fingerprint']}")
    return e, report


def to_conditioning(tokens: torch.Tensor, options: dict[str, Any] | None = None,
                    pooled: torch.Tensor | None = None) -> list[list[Any]]:
    """ComfyUI CONDITIONING of one prompt: [[tokens [1, T, D], options]], with ``pooled`` [P] as its pooled_output
    (replacing the options' own) when given."""
    opts = dict(options or {})
    if pooled is not None:
        opts["pooled_output"] = pooled.detach().float().unsqueeze(0).clone()
    return [[tokens.detach().float().unsqueeze(0).clone(), opts]]


def prompt_text(dynprompt: Any, unique_id: str | None) -> str:
    """The text of the CLIPTextEncode feeding ``conditioning``, also through one conditioning node in between (Flux
    prompts come through FluxGuidance); '' when unknown (the text only labels the file)."""
    text = _host.upstream_text(dynprompt, unique_id, "conditioning")
    if text or dynprompt is None or unique_id is None:
        return text
    link = dynprompt.get_node(str(unique_id)).get("inputs", {}).get("conditioning")
    return _host.upstream_text(dynprompt, str(link[0]), "conditioning") if isinstance(link, list) else ""


def _file_state(name: str) -> tuple[Any, ...]:
    """Changes when the embedding or its checkpoint changes on disk (for fingerprint_inputs)."""
    try:
        out = output_path(name)
    except SeedInvariantError as exc:  # validation reports it; here only "changed"
        return ("bad name", str(exc))
    state: list[Any] = [str(out)]
    for p in (out, checkpoint_for(out)):
        try:
            st = p.stat()
            state.append((st.st_mtime_ns, st.st_size))
        except OSError:
            state.append(None)
    return tuple(state)


# ------------------------------------------------------------------ nodes


class NoiseQuerySeedInvariantPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQuerySeedInvariantPrompt",
            display_name="NoiseQuery Seed-Invariant Prompt",
            category="NoiseQuery/explore",
            description=(
                "Carries a liked image to other seeds through the prompt: tunes the prompt's conditioning tokens, and its "
                "pooled vector on SDXL, SD3 and Flux.1 (SD1.x/SD2.x take tokens only), with the model's own training "
                "target (the model stays frozen and unchanged) so that the model denoises toward the liked image from random seeds "
                "and noise levels, with a pull back toward the original prompt. Saves "
                "models/noisequery_embeddings/<name>.safetensors (usable only with this model), checkpoints as it goes; "
                "re-queueing resumes an interrupted run, or extends it when you raise iterations. Connect the output "
                "conditioning to a KSampler's positive and try other seeds."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with: SD1.x/SD2.x, SDXL, SD3/SD3.5 or Flux.1 (frozen; the embedding only fits it)."),
                io.Vae.Input("vae", tooltip="Its VAE: encodes the liked image once."),
                io.Conditioning.Input("conditioning", tooltip="The prompt to start from (one CLIPTextEncode; on Flux through FluxGuidance if you use it): its tokens, and its pooled vector on SDXL/SD3/Flux, are tuned; its other options (guidance, sizes) are kept."),
                io.Image.Input("image", tooltip="The liked image (or a few of one size), e.g. a render you liked. It is encoded at its own size (cropped to a multiple of 8): 512x512 for SD1.5, 1024x1024 for SDXL/SD3/Flux."),
                io.String.Input("name", default="my_invariant_prompt", tooltip="File name in models/noisequery_embeddings (without .safetensors; sub-folders with '/' are fine)."),
                io.Int.Input("iterations", default=200, min=1, max=100_000, tooltip="Optimisation steps (>= 1). Raise it and re-queue to continue a finished run."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Random seeds (noises) per step; UNet rows per step = batch_size."),
                io.Float.Input("learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6, tooltip="Adam learning rate of the tokens."),
                io.Float.Input("prompt_weight", default=0.1, min=0.0, max=1000.0, step=0.01, round=1e-4, tooltip="How strongly the tokens (and the pooled vector, each by its own mean) are kept near the original prompt (mean squared distance). 0 lets them go wherever the image pulls; higher keeps more of the prompt's meaning."),
                io.Int.Input("t_min", default=0, min=0, max=999, tooltip="Lowest training timestep (of 1000 on every family): low values also fit fine detail."),
                io.Int.Input("t_max", default=999, min=0, max=999, tooltip="Highest training timestep: high values decide colour and layout, what most differs between seeds."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=False, tooltip="Seed of the run: every step's noises and timesteps (the held-out report uses other, fixed seeds)."),
                io.Int.Input("checkpoint_every", default=25, min=1, max=100_000, tooltip="Write a resumable checkpoint every this many steps (and when interrupted)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this name's checkpoint when settings, model, prompt and image match; off starts over."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The tuned prompt: connect to a KSampler's positive and sample any seed."),
                io.String.Output(display_name="embedding", tooltip="The saved file's name, for NoiseQuery Load Seed-Invariant Prompt."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step (orange: running mean); title: held-out loss before -> after."),
                io.String.Output(display_name="report", tooltip="What was tuned, the held-out loss on unseen seeds before and after, the base model's fingerprint."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str | None = None, iterations: int | None = None, learning_rate: float | None = None,
                        prompt_weight: float | None = None, t_min: int | None = None, t_max: int | None = None
                        ) -> bool | str:
        # ComfyUI skips its own min/max checks for inputs named here: numbers_problem re-applies the schema's ranges
        # (and refuses NaN/inf).
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        if name is not None:
            try:
                output_path(name)
            except SeedInvariantError as exc:
                return f"NoiseQuerySeedInvariantPrompt: input 'name': {exc}"
        if t_min is not None and t_max is not None and t_min > t_max:
            return f"NoiseQuerySeedInvariantPrompt: t_min {t_min} is above t_max {t_max}."
        return True

    @classmethod
    def fingerprint_inputs(cls, name: str = "", **_: Any) -> Any:
        # Same inputs and the same files on disk: the cached result stands. A deleted or resumed file re-runs it.
        return _file_state(name)

    @classmethod
    def execute(cls, model: Any, vae: Any, conditioning: Any, image: torch.Tensor, name: str, iterations: int,
                batch_size: int, learning_rate: float, prompt_weight: float, t_min: int, t_max: int, seed: int,
                checkpoint_every: int, resume: bool) -> io.NodeOutput:
        require_numbers(cls, locals())  # linked values were not there to check at queue time
        settings = InvariantSettings(iterations=iterations, batch_size=batch_size, learning_rate=learning_rate,
                                     prompt_weight=prompt_weight, t_min=t_min, t_max=t_max, seed=seed,
                                     checkpoint_every=checkpoint_every)
        out = output_path(name)
        uid = cls.hidden.unique_id if cls.hidden else None
        dyn = cls.hidden.dynprompt if cls.hidden else None
        work = _host.NodeWork(uid, iterations)
        fname = out.relative_to(folder_paths.get_folder_paths(FOLDER)[0]).as_posix()
        e, report = run_optimisation(model, vae, conditioning, image, settings, out, label=fname,
                                     model_name=_host.upstream_model_name(dyn, uid),
                                     prompt_text=prompt_text(dyn, uid), resume=resume,
                                     progress=work.progress, check_cancel=work.check_cancel)
        _, options = prompt_tokens(conditioning, None)
        curve = to_image([loss_curve(e.loss_history, e.held_out)])
        return io.NodeOutput(to_conditioning(e.tokens, options, e.pooled), fname, curve, report, ui={"text": [report]})


class NoiseQueryLoadInvariantPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryLoadInvariantPrompt",
            display_name="NoiseQuery Load Seed-Invariant Prompt",
            category="NoiseQuery/explore",
            description=("Loads a seed-invariant prompt saved by NoiseQuery Seed-Invariant Prompt as CONDITIONING: the "
                         "tuned tokens, the tuned pooled vector (SDXL/SD3/Flux) and the prompt's other options (Flux "
                         "guidance, SDXL sizes). Refuses a file made on another model or family (tuned tokens only "
                         "mean something to that model)."),
            inputs=[
                io.Model.Input("model", tooltip="The model you will sample with: must be the one the embedding was made on."),
                io.Combo.Input("embedding", options=embedding_files(), tooltip="A file from models/noisequery_embeddings."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The tuned prompt, for a KSampler's positive."),
                io.String.Output(display_name="report", tooltip="Where the embedding came from and its held-out loss."),
            ],
            is_output_node=True,  # shows its report on the node, and a refused file fails the queue visibly
        )

    @classmethod
    def fingerprint_inputs(cls, embedding: str = "", **_: Any) -> Any:
        try:
            st = embedding_path(embedding).stat()
            return (embedding, st.st_mtime_ns, st.st_size)
        except SeedInvariantError as exc:  # execute reports it; here only "changed"
            return ("missing", embedding, str(exc))

    @classmethod
    def execute(cls, model: Any, embedding: str) -> io.NodeOutput:
        e = load_embedding(embedding_path(embedding))
        family = check_model(model)
        check_fits_model(e, _host.model_fingerprint(model), context_dim_of(model), embedding, family.key,
                         FAMILY_LABELS)
        if family.pooled and e.pooled is None:
            raise SeedInvariantError(f"{embedding}: no pooled vector, which {family.label} models need; the file is "
                                     f"damaged or was not written by NoiseQuery. Make the embedding again.")
        text = e.prompt.get("text") or "?"
        tuned = f" + pooled {e.pooled_dim}" if e.pooled_dim else ""
        report = (f"{embedding}: {e.tokens.shape[0]} tokens x {e.context_dim}{tuned} ({family.label}), "
                  f"{e.iterations_done} iterations from prompt {text!r} (hash {e.prompt.get('hash')})\n"
                  f"{held_out_summary(e)}")
        # the prompt's options come back with the tokens: Flux guidance, SDXL size options, the tuned pooled vector
        return io.NodeOutput(to_conditioning(e.tokens, e.options, e.pooled), report, ui={"text": [report]})


INVARIANT_NODES: list[type] = [NoiseQuerySeedInvariantPrompt, NoiseQueryLoadInvariantPrompt]
