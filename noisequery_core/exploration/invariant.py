"""Seed-invariant prompt: tune a prompt's conditioning tokens so that any seed denoises toward a liked image.

The talk's point: the seed decides much of an image. Given a liked image (or a few), its latent x_0, the
model and a prompt's conditioning c_0 [T, D] (tokens in the denoiser's text-conditioning space: cross-attention
context for SD1.x/SD2.x/SDXL, joint-attention input for SD3 and Flux), plus, for models that also take the
prompt's pooled vector p_0 [P] (SDXL's ADM input, SD3's and Flux's ``y``), that vector, this optimises c (and p),
with the model frozen, on the model's own denoising loss over random seeds and timesteps, plus a pull back
toward the prompt:

    per iteration: B noises n (fresh seeds), timesteps t in t_min..t_max of the model's schedule, images i;
    x_t = x_0^i + σ_t·n                  (ComfyUI's sampling space for eps and v models; flow models (SD3, Flux)
                                          inject their own noising, (1−σ)·x_0 + σ·n)
    loss = mean ‖x̂_0(x_t, σ_t, c, p) − x_0^i‖²  +  prompt_weight · (mean ‖c − c_0‖² + mean ‖p − p_0‖²)

x̂_0 is the denoised prediction, the target ComfyUI's own training node (comfy_extras/nodes_train.py) uses for
every model type, with x_t made by the model's own noise_scaling; from the injected ``predict_noise`` (the same
callable NoiseCLR trains with, returning (x_t − x̂_0)/σ) it is x_t − σ·ε̂, so for eps models the first term is
mean ‖σ·(ε̂ − n)‖². Weighting by σ² favours high noise levels, where colour and layout are decided, which is what
should stop depending on the seed. The pooled vector has its own anchor term, a mean over its own width.

The machinery is the one NoiseCLR trains with (noisequery_core/training.py): per-iteration randomness from a
(seed, iteration) generator and a plain Adam, whose state is checkpointed, so a resumed run is bit for bit the
run that was never interrupted (same device). Gradients reach the tokens only.

File: safetensors with ``tokens`` [T, D] (the tuned conditioning) and ``original`` [T, D] (the prompt's),
float32, for pooled families also ``pooled`` [P] and ``original_pooled`` [P], and one metadata entry
``noisequery_embedding`` holding JSON (format version, model family, base model identity, prompt hash, the
prompt's other conditioning options such as Flux guidance or SDXL sizes, settings, seeds, loss history, held-out
loss). Version 1 files (before families) read as family "sd" without a pooled part. A checkpoint is the same plus
Adam's tensors, at ``<name>.safetensors.checkpoint`` (never listed as an embedding).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NoiseQueryError
from ..imaging import loss_curve_picture
from ..noise import batch_noise
from ..tagged_file import TaggedFormat, meta_width, read_tagged, write_tagged
from ..training import (
    AdamState,
    AddNoise,
    PredictNoise,
    RunSettings,
    adam_update,
    checkpoint_path_for,
    iteration_generator,
    run_iterations,
)
from ..work import CheckCancel, Progress, never_cancel, no_progress

log = logging.getLogger("noisequery")

FORMAT = "noisequery.seed_invariant_prompt"
FORMAT_VERSION = 2  # 2: "family", the optional pooled part and the prompt's options; 1 (SD1.x/SD2.x) is still read
META_KEY = "noisequery_embedding"
# The family of a file written before families were recorded: the node then took SD1.x/SD2.x UNets only.
LEGACY_FAMILY = "sd"
FAMILY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_NAME_PART = 100  # characters per folder/file part of an embedding name (+ suffixes stays < 255 bytes)
# Tokens start as the text encoder's output (values of a few tens) and move by small Adam steps; beyond this a
# file is damaged or not written by NoiseQuery.
FLOAT_SETTINGS = ("learning_rate", "prompt_weight")
# Seeds the held-out loss uses by default: far from anything a run draws (training noise comes from the run's
# own generator, not from seeds), and the same for every run so reports compare.
HELD_OUT_SEEDS = (1_000_003, 1_000_033, 1_000_037, 1_000_039)
HELD_OUT_TIMESTEPS = 4
MAX_OPTIONS = 32  # scalar conditioning options kept (guidance, SDXL sizes, ...): a few in practice


class SeedInvariantError(NoiseQueryError):
    """Seed-invariant prompt: bad settings or inputs, or an embedding file that is missing, damaged or unfit."""


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class InvariantSettings(RunSettings):
    """Everything that decides a run's result (saved in the file, compared on resume)."""

    FLOAT_SETTINGS = FLOAT_SETTINGS
    iterations: int = 200
    batch_size: int = 4  # noises (seeds) per iteration
    learning_rate: float = 5e-3
    prompt_weight: float = 0.1
    t_min: int = 0
    t_max: int = 999
    seed: int = 0
    checkpoint_every: int = 25

    def validate(self, schedule_length: int | None = None) -> None:
        """Raise SeedInvariantError naming the first setting out of range."""
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations {self.iterations} must be >= 1 (0 would return the prompt unchanged).")
        if self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size} must be >= 1 (noises per iteration).")
        problems += self.common_problems(schedule_length)
        if problems:
            raise SeedInvariantError(f"Seed-invariant prompt settings: {problems[0]}")


# ------------------------------------------------------------------ the embedding and its file


@dataclass
class Embedding:
    """Tuned conditioning tokens (and pooled vector) plus what is needed to use them and know where they came from.

    ``family`` names the model family (the host's word: "sd", "sdxl", "sd3", "flux"); ``pooled`` and
    ``original_pooled`` are both present (families with a pooled input) or both None; ``options`` holds the
    prompt's scalar conditioning options (e.g. Flux's "guidance", SDXL's "width"), restored with the tokens.
    """

    tokens: torch.Tensor  # [T, D] float32
    original: torch.Tensor  # [T, D] float32: the prompt's tokens they started from
    base_model: dict[str, Any] = field(default_factory=dict)  # {"name", "fingerprint", "model_class", "context_dim"}
    prompt: dict[str, Any] = field(default_factory=dict)  # {"hash", "text"}
    settings: InvariantSettings = field(default_factory=InvariantSettings)
    iterations_done: int = 0
    loss_history: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # {"images", "fingerprint", "latent_shape"}
    held_out: dict[str, Any] = field(default_factory=dict)  # {"seeds", "before", "after"}
    created: str = ""
    pooled: torch.Tensor | None = None  # [P] float32: the tuned pooled vector
    original_pooled: torch.Tensor | None = None  # [P] float32: the prompt's
    family: str = LEGACY_FAMILY
    options: dict[str, Any] = field(default_factory=dict)  # the prompt's scalar options ({"guidance": 3.5}, ...)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.original.shape:
            raise SeedInvariantError(f"embedding tokens {tuple(self.tokens.shape)} and original "
                                     f"{tuple(self.original.shape)} must both be [T, D] of one shape.")
        if (self.pooled is None) != (self.original_pooled is None):
            raise SeedInvariantError("a pooled part needs both the tuned and the prompt's pooled vector (pooled and "
                                     "original_pooled); one of them is missing.")
        if self.pooled is not None and self.original_pooled is not None and (
                self.pooled.dim() != 1 or self.pooled.shape != self.original_pooled.shape):
            raise SeedInvariantError(f"pooled {tuple(self.pooled.shape)} and original_pooled "
                                     f"{tuple(self.original_pooled.shape)} must both be [P] of one shape.")
        if not self.family or len(self.family) > 32 or not set(self.family) <= FAMILY_CHARS:
            raise SeedInvariantError(f"model family {self.family[:40]!r} is not a family name (lower-case letters, "
                                     "digits, '.', '_' or '-').")
        self.options = scalar_options(self.options)

    @property
    def context_dim(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def pooled_dim(self) -> int:
        """P, the width of the pooled part; 0 when there is none."""
        return 0 if self.pooled is None else int(self.pooled.shape[0])

    def seeds(self) -> dict[str, Any]:
        """Which noises the run used: the run seed's generator drew iterations × batch_size of them."""
        return {"run_seed": int(self.settings.seed), "noise_draws": int(self.iterations_done * self.settings.batch_size),
                "held_out": list(self.held_out.get("seeds") or [])}

    def meta(self, kind: str = "embedding") -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "family": self.family,
            "pooled_dim": self.pooled_dim,
            "options": dict(self.options),
            "token_count": int(self.tokens.shape[0]),
            "context_dim": self.context_dim,
            "base_model": dict(self.base_model),
            "prompt": dict(self.prompt),
            "settings": self.settings.to_dict(),
            "iterations_done": int(self.iterations_done),
            "loss_history": [float(x) for x in self.loss_history],
            "data": dict(self.data),
            "seeds": self.seeds(),
            "held_out": dict(self.held_out),
            "created": self.created,
        }


def save_embedding(path: str | Path, e: Embedding, *, kind: str = "embedding",
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``e`` (atomically: readers see the old file or the new one)."""
    tensors = {"tokens": e.tokens.detach().to("cpu", torch.float32),
               "original": e.original.detach().to("cpu", torch.float32)}
    if e.pooled is not None and e.original_pooled is not None:
        tensors["pooled"] = e.pooled.detach().to("cpu", torch.float32)
        tensors["original_pooled"] = e.original_pooled.detach().to("cpu", torch.float32)
    tensors.update(extra_tensors or {})
    return write_tagged(path, tensors, e.meta(kind), META_KEY)


def scalar_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a prompt's CONDITIONING that a file keeps: finite numbers, booleans and short strings under
    short names (tensors such as pooled_output are stored apart; anything else is dropped), at most MAX_OPTIONS."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if not isinstance(k, str) or len(k) > 64 or len(out) >= MAX_OPTIONS:
            continue
        if isinstance(v, bool) or (isinstance(v, str) and len(v) <= 200):
            out[k] = v
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
    return out


_FILE = TaggedFormat(
    META_KEY, FORMAT, FORMAT_VERSION, what="NoiseQuery embedding", meta_label="NoiseQuery embedding",
    missing="Make one with NoiseQuery Seed-Invariant Prompt, or pick another file from models/noisequery_embeddings.",
    redo="Run the optimisation again.", error=SeedInvariantError,
    bounded=("tokens", "original", "pooled", "original_pooled"))  # text encodings: bounded like one


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = read_tagged(path, _FILE)
    for name in ("tokens", "original"):
        t = tensors.get(name)
        if t is None or t.dim() != 2 or not t.is_floating_point():
            raise SeedInvariantError(f"{path}: tensor {name!r} is missing or not a [T, D] float tensor; the file is "
                                     "damaged.")
    pooled_dim = meta_width(meta, "pooled_dim", path, _FILE)
    if pooled_dim:
        for name in ("pooled", "original_pooled"):
            t = tensors.get(name)
            if t is None or tuple(t.shape) != (pooled_dim,) or not t.is_floating_point():
                raise SeedInvariantError(f"{path}: tensor {name!r} is missing or not a [{pooled_dim}] float vector "
                                         "(the metadata's pooled_dim); the file is damaged.")
    return tensors, meta


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding (or checkpoint) file; raises SeedInvariantError saying what is wrong with it."""
    path = Path(path)
    tensors, meta = _read(path)
    try:
        family = meta.get("family", LEGACY_FAMILY)  # version 1: SD1.x/SD2.x was the only family tuned
        if not isinstance(family, str):
            raise SeedInvariantError(f"family {family!r} is not a name; the file's metadata is damaged.")
        options = meta.get("options") or {}
        if not isinstance(options, dict):
            raise SeedInvariantError(f"options {str(options)[:40]!r} are not a mapping; the file's metadata is damaged.")
        pooled = bool(meta.get("pooled_dim", 0))
        settings = InvariantSettings.from_dict(dict(meta.get("settings") or {}))
        for problem in settings.float_problems():
            raise SeedInvariantError(f"{problem}; the file's metadata is damaged.")
        return Embedding(
            tokens=tensors["tokens"].float(), original=tensors["original"].float(),
            base_model=dict(meta.get("base_model") or {}), prompt=dict(meta.get("prompt") or {}),
            settings=settings, iterations_done=int(meta.get("iterations_done", 0)),
            loss_history=[float(x) for x in meta.get("loss_history") or []],
            data=dict(meta.get("data") or {}), held_out=dict(meta.get("held_out") or {}),
            created=str(meta.get("created", "")),
            pooled=tensors["pooled"].float() if pooled else None,
            original_pooled=tensors["original_pooled"].float() if pooled else None,
            family=family, options=options,
        )
    except SeedInvariantError as exc:
        raise SeedInvariantError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SeedInvariantError(f"{path}: malformed embedding metadata ({exc}); the file is damaged.") from exc


def check_fits_model(e: Embedding, fingerprint: str, context_dim: int | None, where: str, family: str | None = None,
                     family_labels: Mapping[str, str] | None = None) -> None:
    """Refuse an embedding made on another model: tokens tuned through one model mean nothing to another.

    ``family``: the connected model's family key (checked first, so a file of another family is refused naming
    both families); ``family_labels`` words for family keys ({"sdxl": "SDXL"}) in that message.
    """
    labels = family_labels or {}

    def name(key: str) -> str:
        return f"{labels[key]} ({key!r})" if key in labels else repr(key)

    if family is not None and e.family != family:
        raise SeedInvariantError(
            f"{where} was made on the {name(e.family)} family ({e.base_model.get('model_class', '?')}), but the "
            f"connected model is {name(family)}. Seed-invariant tokens live in one family's conditioning space: "
            f"connect the model it was made on, or make a new embedding for this one.")
    if context_dim is not None and e.context_dim != context_dim:
        raise SeedInvariantError(
            f"{where}: these tokens are {e.context_dim} wide (made on {e.base_model.get('model_class', '?')}) but the "
            f"model's cross-attention takes {context_dim}: the file belongs to another model family.")
    fp = e.base_model.get("fingerprint")
    if fp != fingerprint:
        raise SeedInvariantError(
            f"{where} was made on another model ({e.base_model.get('model_class', '?')} "
            f"{e.base_model.get('name') or ''}, fingerprint {fp}); the connected model's fingerprint is {fingerprint}. "
            f"Seed-invariant tokens are tuned through one model's weights (LoRAs included): connect that model, or "
            f"make a new embedding for this one.")


def check_embedding_name(name: str) -> str:
    """An embedding name without ``.safetensors``, or SeedInvariantError saying why it cannot be a file name."""
    clean = name.strip()
    if clean.endswith(".safetensors"):
        clean = clean[: -len(".safetensors")]
    parts = clean.replace("\\", "/").split("/")
    if (not clean or "\x00" in clean or ":" in clean or clean.startswith(("/", "\\"))
            or any(p in ("", ".", "..") for p in parts)):
        raise SeedInvariantError(f"name {name!r}: use a plain file name like 'red_barn' (sub-folders with '/' are "
                                 f"fine; '..', absolute paths, ':' and empty parts are not).")
    for p in parts:
        if len(p) > MAX_NAME_PART:
            raise SeedInvariantError(f"name {name[:40]!r}…: the part {p[:20]!r}… has {len(p)} characters; at most "
                                     f"{MAX_NAME_PART} are allowed (the file system limits file names).")
    return clean


# ------------------------------------------------------------------ the loss


def denoising_loss(predict_noise: PredictNoise, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                   context: torch.Tensor, pooled: torch.Tensor | None = None,
                   add_noise: AddNoise | None = None) -> torch.Tensor:
    """Mean ‖x̂_0 − x_0‖², x̂_0 = x_t − σ·ε̂ the denoised prediction (ComfyUI's training target).

    x0, noise: [B, C, H, W]; sigma: [B]; context: [B, T, D]; pooled: [B, P] for models with a pooled input (then
    ``predict_noise`` is called with it). ``add_noise`` makes x_t (flow models: (1−σ)·x_0 + σ·noise); None is
    x_t = x_0 + σ·noise, where the loss is mean ‖σ·(ε̂ − noise)‖², written so. Differentiable in ``context`` and
    ``pooled``.
    """
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = x0 + s * noise if add_noise is None else add_noise(x0, noise, sigma)
    args = [x_t, sigma, context] + ([pooled] if pooled is not None else [])
    eps = predict_noise(*args).float()
    if add_noise is None:
        return ((s * (eps - noise)) ** 2).mean()
    return ((x_t.float() - s * eps - x0) ** 2).mean()


def _batch(s: InvariantSettings, it: int, latents: torch.Tensor, sigma_table: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s images, noises and sigmas (its own generator: resuming needs no RNG state)."""
    g = iteration_generator(s.seed, it)
    img = torch.randint(0, latents.shape[0], (s.batch_size,), generator=g)
    t = torch.randint(s.t_min, s.t_max + 1, (s.batch_size,), generator=g)
    noise = torch.randn((s.batch_size, *latents.shape[1:]), generator=g).to(latents.device)
    return latents[img.to(latents.device)], noise, sigma_table[t].to(latents.device)


def held_out_timesteps(s: InvariantSettings, count: int = HELD_OUT_TIMESTEPS) -> list[int]:
    """``count`` timesteps spread evenly over t_min..t_max (the held-out loss's fixed grid)."""
    return sorted({int(round(x)) for x in np.linspace(s.t_min, s.t_max, max(1, count))})


def held_out_loss(latents: torch.Tensor, tokens: torch.Tensor, predict_noise: PredictNoise, sigmas: torch.Tensor,
                  seeds: Sequence[int], timesteps: Sequence[int], chunk: int = 16, *,
                  pooled: torch.Tensor | None = None, add_noise: AddNoise | None = None) -> float:
    """The denoising loss of ``tokens`` [T, D] (and ``pooled`` [P]) on every image × seed × timestep: deterministic,
    so the loss of the prompt and of the tuned tokens compare without sampling noise. Each seed's noise is
    KSampler's for that seed at batch size 1 (noisequery_core/noise.py), a noise no training iteration drew.
    ``add_noise`` as in training."""
    dev = latents.device
    lat = latents.detach().float()
    noise = batch_noise(list(seeds), lat.shape[1:]).to(dev)
    sig = sigmas.detach().to("cpu", torch.float32)
    rows = [(i, j, t) for i in range(lat.shape[0]) for j in range(len(seeds)) for t in timesteps]
    total = 0.0
    with torch.no_grad():
        for a in range(0, len(rows), chunk):
            part = rows[a : a + chunk]
            x0 = torch.stack([lat[i] for i, _, _ in part])
            n = torch.stack([noise[j] for _, j, _ in part])
            sigma = torch.stack([sig[t] for _, _, t in part]).to(dev)
            ctx = tokens.detach().to(dev, torch.float32).unsqueeze(0).expand(len(part), -1, -1)
            pool = pooled.detach().to(dev, torch.float32).unsqueeze(0).expand(len(part), -1) \
                if pooled is not None else None
            total += float(denoising_loss(predict_noise, x0, n, sigma, ctx, pool, add_noise)) * len(part)
    return total / max(1, len(rows))


# ------------------------------------------------------------------ optimisation


def _save_checkpoint(path: Path, st: AdamState, template: Embedding) -> Path:
    e = dataclasses.replace(template, tokens=st.params[0], pooled=st.pooled[0] if st.pooled is not None else None,
                            iterations_done=st.iteration, loss_history=list(st.losses))
    return save_embedding(path, e, kind="checkpoint", extra_tensors=st.tensors())


def same_origin(template: Embedding, got: Embedding) -> list[str]:
    """Why ``got`` (a checkpoint or finished file) is not a run of ``template``'s settings, model, prompt and images."""
    out = [f"settings ({'; '.join(d)})" for d in [template.settings.same_run(got.settings)] if d]
    for what, a, b in (("family", template.family, got.family),
                       ("model", template.base_model.get("fingerprint"), got.base_model.get("fingerprint")),
                       ("prompt", template.prompt.get("hash"), got.prompt.get("hash")),
                       ("images", template.data.get("fingerprint"), got.data.get("fingerprint"))):
        if a != b:
            out.append(f"{what} ({b}, now {a})")
    if tuple(got.tokens.shape) != tuple(template.original.shape):
        out.append(f"token shape ({tuple(got.tokens.shape)}, now {tuple(template.original.shape)})")
    if got.pooled_dim != template.pooled_dim:
        out.append(f"pooled width ({got.pooled_dim}, now {template.pooled_dim})")
    elif template.original_pooled is not None and got.original_pooled is not None \
            and not torch.equal(got.original_pooled, template.original_pooled.cpu()):
        out.append("prompt (its pooled vector)")
    if got.options != template.options:
        out.append(f"prompt options ({got.options}, now {template.options})")
    return out


def _load_checkpoint(path: Path, template: Embedding, device: torch.device) -> AdamState:
    tensors, _ = _read(path)
    got = load_embedding(path)
    diffs = same_origin(template, got)
    if diffs:
        raise SeedInvariantError(f"checkpoint {path} belongs to another run: other {', '.join(diffs)}. Put them back, "
                                 f"save under another name, or turn resume off to start over.")
    name = AdamState.missing(tensors, pooled=got.pooled is not None)
    if name is not None:
        raise SeedInvariantError(f"{path} has no optimiser state ({name}); it is not a checkpoint. Turn resume off "
                                 "to start over.")
    return AdamState.restore(got.tokens.unsqueeze(0), tensors, got.iterations_done, got.loss_history, device,
                             got.pooled.unsqueeze(0) if got.pooled is not None else None)


def optimise_prompt(
    latents: torch.Tensor,
    tokens: torch.Tensor,
    predict_noise: PredictNoise,
    sigmas: torch.Tensor,
    settings: InvariantSettings,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    base_model: dict[str, Any] | None = None,
    prompt: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    held_out_seeds: Sequence[int] = HELD_OUT_SEEDS,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
    device: torch.device | str | None = None,
    pooled: torch.Tensor | None = None,
    add_noise: AddNoise | None = None,
    family: str = LEGACY_FAMILY,
    options: Mapping[str, Any] | None = None,
) -> Embedding:
    """Tune ``tokens`` so that the liked ``latents`` come back from any seed's noise (see the module docstring).

    Args:
        latents: [M, C, H, W] clean latents of the liked image(s) in the model's space.
        tokens: [T, D] the prompt's conditioning tokens (the start, and the anchor of the prompt_weight term).
        predict_noise: ``(x_t [B,C,H,W], sigma [B], context [B,T,D]) -> eps``, differentiable in ``context``, with
            x_t = x_0 + sigma·noise (the shared training forward: nodes/_training.make_predict_noise).
        sigmas: [L] the model's noise levels by timestep (model_sampling.sigmas); t_min..t_max index into it.
        settings: the run's InvariantSettings.
        checkpoint_path: written every ``checkpoint_every`` iterations, at the end and on a stop; None for none.
        resume: continue from ``checkpoint_path`` when it exists (same settings, model, prompt and images).
        base_model / prompt / data: identities stored in the file and checked on resume.
        held_out_seeds: seeds of the held-out loss reported before and after (``held_out`` of the result).
        progress: ``progress(iterations done, total, "loss …")`` after each iteration (noisequery_core.work).
        check_cancel: called before each iteration; what it raises stops the run after a checkpoint and propagates.
        device: where the tokens live (default: latents' device).
        pooled: [P] the prompt's pooled vector, for models that also take one (SDXL's ADM input, SD3/Flux ``y``):
            it is tuned with the tokens, anchored to itself by the prompt_weight term, and ``predict_noise`` is
            called as ``(x_t, sigma, context, pooled [B, P])``.
        add_noise: ``(x_0, noise, sigma [N]) -> x_t`` in the model's sampling space (flow models:
            (1−σ)·x_0 + σ·noise); None for x_0 + σ·noise.
        family: the model family's name, stored in the file (checked on resume and when loading).
        options: the prompt's scalar conditioning options (Flux guidance, SDXL sizes), stored to be restored.

    Returns: the Embedding (iterations_done == settings.iterations).
    Raises: SeedInvariantError for bad settings, inputs or an unfit checkpoint; whatever check_cancel raises.
    """
    s = settings
    s.validate(schedule_length=int(sigmas.shape[0]))
    if latents.dim() != 4 or latents.shape[0] < 1:
        raise SeedInvariantError(f"latents must be [M >= 1, C, H, W], got shape {tuple(latents.shape)}.")
    if tokens.dim() != 2:
        raise SeedInvariantError(f"tokens must be [T, D], got shape {tuple(tokens.shape)}.")
    if pooled is not None and pooled.dim() != 1:
        raise SeedInvariantError(f"pooled must be one vector [P], got shape {tuple(pooled.shape)}.")
    if not bool(torch.isfinite(tokens).all()) or not bool(torch.isfinite(latents).all()) or (
            pooled is not None and not bool(torch.isfinite(pooled).all())):
        raise SeedInvariantError("the conditioning or the liked image's latent holds NaN or infinite values; check "
                                 "the nodes that made them.")
    dev = torch.device(device) if device is not None else latents.device
    original = tokens.detach().to(dev, torch.float32)
    original_pooled = pooled.detach().to(dev, torch.float32) if pooled is not None else None
    latents = latents.detach().to(dev, torch.float32)
    sigma_table = sigmas.detach().to("cpu", torch.float32)
    template = Embedding(tokens=original.cpu(), original=original.cpu(), base_model=dict(base_model or {}),
                         prompt=dict(prompt or {}), settings=s, data=dict(data or {}),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         pooled=original_pooled.cpu() if original_pooled is not None else None,
                         original_pooled=original_pooled.cpu() if original_pooled is not None else None,
                         family=family, options=dict(options or {}))
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None

    st: AdamState | None = None
    if ckpt is not None and resume and ckpt.is_file():
        st = _load_checkpoint(ckpt, template, dev)
        log.info("seed-invariant prompt: resuming %s at iteration %d of %d", ckpt, st.iteration, s.iterations)
    if st is None:
        st = AdamState.fresh(original.clone().unsqueeze(0),
                             original_pooled.clone().unsqueeze(0) if original_pooled is not None else None)

    rows = torch.zeros(1, dtype=torch.int64)  # Adam updates rows of [K, T, D]; here K = 1
    state = st

    def step(it: int) -> float:
        x0, noise, sigma = _batch(s, it, latents, sigma_table)
        ctx = state.params.clone().requires_grad_(True)  # [1, T, D]: with the pooled part, all that gets a gradient
        if state.pooled is None or original_pooled is None:
            loss = denoising_loss(predict_noise, x0, noise, sigma, ctx.expand(s.batch_size, -1, -1))
            if s.prompt_weight:
                loss = loss + s.prompt_weight * ((ctx[0] - original) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, ctx)
            with torch.no_grad():
                adam_update(state, rows, grad.detach(), s.learning_rate)
            return float(loss.detach())
        pool = state.pooled.clone().requires_grad_(True)  # [1, P]
        loss = denoising_loss(predict_noise, x0, noise, sigma, ctx.expand(s.batch_size, -1, -1),
                              pool.expand(s.batch_size, -1), add_noise)
        if s.prompt_weight:
            # each part anchored to the prompt by its own mean: the token rows and the pooled vector differ in width
            loss = loss + s.prompt_weight * (((ctx[0] - original) ** 2).mean() + ((pool[0] - original_pooled) ** 2).mean())
        grad, pooled_grad = torch.autograd.grad(loss, (ctx, pool))
        with torch.no_grad():
            adam_update(state, rows, grad.detach(), s.learning_rate, pooled_grad.detach())
        return float(loss.detach())

    save = functools.partial(_save_checkpoint, ckpt, state, template) if ckpt is not None else None
    run_iterations(state, s.iterations, step, checkpoint_every=s.checkpoint_every, save=save, progress=progress,
                   check_cancel=check_cancel, label="seed-invariant prompt", error=SeedInvariantError,
                   advice=f"lower the learning rate (now {s.learning_rate}).")

    tuned = st.params[0].detach()
    tuned_pooled = st.pooled[0].detach() if st.pooled is not None else None
    steps = held_out_timesteps(s)
    held: dict[str, Any] = {"seeds": [int(x) for x in held_out_seeds], "timesteps": steps}
    if held_out_seeds:
        held["before"] = held_out_loss(latents, original, predict_noise, sigmas, held_out_seeds, steps,
                                       pooled=original_pooled, add_noise=add_noise)
        held["after"] = held_out_loss(latents, tuned, predict_noise, sigmas, held_out_seeds, steps,
                                      pooled=tuned_pooled, add_noise=add_noise)
    return dataclasses.replace(template, tokens=tuned.cpu(), iterations_done=st.iteration,
                               pooled=tuned_pooled.cpu() if tuned_pooled is not None else None,
                               loss_history=list(st.losses), held_out=held)


def checkpoint_for(path: str | Path) -> Path:
    """Where the resumable checkpoint of embedding file ``path`` lives (``<name>.safetensors.checkpoint``: never
    listed)."""
    return checkpoint_path_for(path)


# ------------------------------------------------------------------ how close renders come to the liked image


def appearance_distance(image: np.ndarray, liked: np.ndarray) -> tuple[float, float]:
    """(colour, layout) distance of ``image`` to ``liked`` (uint8 or float HxWx3), in CIEDE2000 units, from the
    library's own colour features (search/color.py): colour = mean ΔE00 of the named regions' mean colours,
    layout = mean ΔE00 over the 8×8 layout grid's cells."""
    from ..search.color import analyse, layout_to_lab
    from ..search.colorspace import ciede2000

    f = analyse([image, liked])
    regions = f.regions.astype(np.float32)
    colour = float(np.mean(ciede2000(regions[0], regions[1])))
    grid = layout_to_lab(f.layout)
    layout = float(np.mean(ciede2000(grid[0].reshape(-1, 3), grid[1].reshape(-1, 3))))
    return colour, layout


def held_out_summary(e: Embedding) -> str:
    """'held-out loss 1.23 -> 0.45 (-63 %) on 4 seeds x 4 timesteps' for reports."""
    h = e.held_out
    if "before" not in h or "after" not in h:
        return "held-out loss not measured"
    before, after = float(h["before"]), float(h["after"])
    pct = (after - before) / before * 100 if before else 0.0
    return (f"held-out denoising loss {before:.4f} -> {after:.4f} ({pct:+.0f} %) on {len(h.get('seeds', []))} unseen "
            f"seeds x {len(h.get('timesteps', []))} timesteps")


def loss_curve(losses: Sequence[float], held_out: dict[str, Any] | None = None, width: int = 512,
               height: int = 256) -> np.ndarray:
    """The training loss per iteration with its running mean, the held-out loss before -> after in the title,
    as a uint8 [height, width, 3] picture."""
    note = ""
    if held_out and "before" in held_out and "after" in held_out:
        note = f"   held-out {float(held_out['before']):.3f} -> {float(held_out['after']):.3f}"
    return loss_curve_picture(losses, note, width, height)
