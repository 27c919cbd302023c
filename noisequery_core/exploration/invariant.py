"""Seed-invariant prompt: tune a prompt's conditioning tokens so that any seed denoises toward a liked image.

The talk's point: the seed decides much of an image. Given a liked image (or a few), its latent x_0, the
model and a prompt's conditioning c_0 [T, D] (tokens in the denoiser's cross-attention space), this
optimises the tokens c, with the model frozen, on the model's own denoising loss over random seeds and
timesteps, plus a pull back toward the prompt:

    per iteration: B noises n (fresh seeds), timesteps t in t_min..t_max of the model's schedule, images i;
    x_t = x_0^i + σ_t·n                                   (ComfyUI's sampling space, eps and v models alike)
    loss = mean ‖x̂_0(x_t, σ_t, c) − x_0^i‖²  +  prompt_weight · mean ‖c − c_0‖²

x̂_0 is the denoised prediction, the target ComfyUI's own training node (comfy_extras/nodes_train.py) uses;
from the injected ``predict_noise`` (the same callable NoiseCLR trains with) it is x_t − σ·ε̂, so the first
term is mean ‖σ·(ε̂ − n)‖². Weighting by σ² favours high noise levels, where colour and layout are decided,
which is what should stop depending on the seed.

The machinery is the one NoiseCLR trains with (noisequery_core/training.py): per-iteration randomness from a
(seed, iteration) generator and a plain Adam, whose state is checkpointed, so a resumed run is bit for bit the
run that was never interrupted (same device). Gradients reach the tokens only.

File: safetensors with ``tokens`` [T, D] (the tuned conditioning) and ``original`` [T, D] (the prompt's),
float32, and one metadata entry ``noisequery_embedding`` holding JSON (format, base model identity, prompt
hash, settings, seeds, loss history, held-out loss). A checkpoint is the same plus Adam's tensors, at
``<name>.safetensors.checkpoint`` (never listed as an embedding).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NoiseQueryError
from ..imaging import loss_curve_picture
from ..noise import batch_noise
from ..tagged_file import TaggedFormat, read_tagged, write_tagged
from ..training import (
    AdamState,
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
FORMAT_VERSION = 1
META_KEY = "noisequery_embedding"
MAX_NAME_PART = 100  # characters per folder/file part of an embedding name (+ suffixes stays < 255 bytes)
# Tokens start as the text encoder's output (values of a few tens) and move by small Adam steps; beyond this a
# file is damaged or not written by NoiseQuery.
FLOAT_SETTINGS = ("learning_rate", "prompt_weight")
# Seeds the held-out loss uses by default: far from anything a run draws (training noise comes from the run's
# own generator, not from seeds), and the same for every run so reports compare.
HELD_OUT_SEEDS = (1_000_003, 1_000_033, 1_000_037, 1_000_039)
HELD_OUT_TIMESTEPS = 4


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
    """Tuned conditioning tokens plus what is needed to know where they came from."""

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

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.original.shape:
            raise SeedInvariantError(f"embedding tokens {tuple(self.tokens.shape)} and original "
                                     f"{tuple(self.original.shape)} must both be [T, D] of one shape.")

    @property
    def context_dim(self) -> int:
        return int(self.tokens.shape[1])

    def seeds(self) -> dict[str, Any]:
        """Which noises the run used: the run seed's generator drew iterations × batch_size of them."""
        return {"run_seed": int(self.settings.seed), "noise_draws": int(self.iterations_done * self.settings.batch_size),
                "held_out": list(self.held_out.get("seeds") or [])}

    def meta(self, kind: str = "embedding") -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
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
               "original": e.original.detach().to("cpu", torch.float32), **(extra_tensors or {})}
    return write_tagged(path, tensors, e.meta(kind), META_KEY)


_FILE = TaggedFormat(
    META_KEY, FORMAT, FORMAT_VERSION, what="NoiseQuery embedding", meta_label="NoiseQuery embedding",
    missing="Make one with NoiseQuery Seed-Invariant Prompt, or pick another file from models/noisequery_embeddings.",
    redo="Run the optimisation again.", error=SeedInvariantError, bounded=("tokens", "original"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = read_tagged(path, _FILE)
    for name in ("tokens", "original"):
        t = tensors.get(name)
        if t is None or t.dim() != 2 or not t.is_floating_point():
            raise SeedInvariantError(f"{path}: tensor {name!r} is missing or not a [T, D] float tensor; the file is "
                                     "damaged.")
    return tensors, meta


def load_embedding(path: str | Path) -> Embedding:
    """Read an embedding (or checkpoint) file; raises SeedInvariantError saying what is wrong with it."""
    path = Path(path)
    tensors, meta = _read(path)
    try:
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
        )
    except SeedInvariantError as exc:
        raise SeedInvariantError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SeedInvariantError(f"{path}: malformed embedding metadata ({exc}); the file is damaged.") from exc


def check_fits_model(e: Embedding, fingerprint: str, context_dim: int | None, where: str) -> None:
    """Refuse an embedding made on another model: tokens tuned through one UNet mean nothing to another."""
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
                   context: torch.Tensor) -> torch.Tensor:
    """Mean ‖x̂_0 − x_0‖² with x_t = x_0 + σ·noise (x̂_0 = x_t − σ·ε̂, so this is mean ‖σ·(ε̂ − noise)‖²).

    x0, noise: [B, C, H, W]; sigma: [B]; context: [B, T, D]. Differentiable in ``context``.
    """
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    eps = predict_noise(x0 + s * noise, sigma, context).float()
    return ((s * (eps - noise)) ** 2).mean()


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
                  seeds: Sequence[int], timesteps: Sequence[int], chunk: int = 16) -> float:
    """The denoising loss of ``tokens`` [T, D] on every image × seed × timestep: deterministic, so the loss of the
    prompt and of the tuned tokens compare without sampling noise. Each seed's noise is KSampler's for that seed
    at batch size 1 (noisequery_core/noise.py), a noise no training iteration drew."""
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
            total += float(denoising_loss(predict_noise, x0, n, sigma, ctx)) * len(part)
    return total / max(1, len(rows))


# ------------------------------------------------------------------ optimisation


def _save_checkpoint(path: Path, st: AdamState, template: Embedding) -> Path:
    e = dataclasses.replace(template, tokens=st.params[0], iterations_done=st.iteration, loss_history=list(st.losses))
    return save_embedding(path, e, kind="checkpoint", extra_tensors=st.tensors())


def same_origin(template: Embedding, got: Embedding) -> list[str]:
    """Why ``got`` (a checkpoint or finished file) is not a run of ``template``'s settings, model, prompt and images."""
    out = [f"settings ({'; '.join(d)})" for d in [template.settings.same_run(got.settings)] if d]
    for what, a, b in (("model", template.base_model.get("fingerprint"), got.base_model.get("fingerprint")),
                       ("prompt", template.prompt.get("hash"), got.prompt.get("hash")),
                       ("images", template.data.get("fingerprint"), got.data.get("fingerprint"))):
        if a != b:
            out.append(f"{what} ({b}, now {a})")
    if tuple(got.tokens.shape) != tuple(template.original.shape):
        out.append(f"token shape ({tuple(got.tokens.shape)}, now {tuple(template.original.shape)})")
    return out


def _load_checkpoint(path: Path, template: Embedding, device: torch.device) -> AdamState:
    tensors, _ = _read(path)
    got = load_embedding(path)
    diffs = same_origin(template, got)
    if diffs:
        raise SeedInvariantError(f"checkpoint {path} belongs to another run: other {', '.join(diffs)}. Put them back, "
                                 f"save under another name, or turn resume off to start over.")
    name = AdamState.missing(tensors, pooled=False)
    if name is not None:
        raise SeedInvariantError(f"{path} has no optimiser state ({name}); it is not a checkpoint. Turn resume off "
                                 "to start over.")
    return AdamState.restore(got.tokens.unsqueeze(0), tensors, got.iterations_done, got.loss_history, device)


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

    Returns: the Embedding (iterations_done == settings.iterations).
    Raises: SeedInvariantError for bad settings, inputs or an unfit checkpoint; whatever check_cancel raises.
    """
    s = settings
    s.validate(schedule_length=int(sigmas.shape[0]))
    if latents.dim() != 4 or latents.shape[0] < 1:
        raise SeedInvariantError(f"latents must be [M >= 1, C, H, W], got shape {tuple(latents.shape)}.")
    if tokens.dim() != 2:
        raise SeedInvariantError(f"tokens must be [T, D], got shape {tuple(tokens.shape)}.")
    if not bool(torch.isfinite(tokens).all()) or not bool(torch.isfinite(latents).all()):
        raise SeedInvariantError("the conditioning or the liked image's latent holds NaN or infinite values; check "
                                 "the nodes that made them.")
    dev = torch.device(device) if device is not None else latents.device
    original = tokens.detach().to(dev, torch.float32)
    latents = latents.detach().to(dev, torch.float32)
    sigma_table = sigmas.detach().to("cpu", torch.float32)
    template = Embedding(tokens=original.cpu(), original=original.cpu(), base_model=dict(base_model or {}),
                         prompt=dict(prompt or {}), settings=s, data=dict(data or {}),
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None

    st: AdamState | None = None
    if ckpt is not None and resume and ckpt.is_file():
        st = _load_checkpoint(ckpt, template, dev)
        log.info("seed-invariant prompt: resuming %s at iteration %d of %d", ckpt, st.iteration, s.iterations)
    if st is None:
        st = AdamState.fresh(original.clone().unsqueeze(0))

    rows = torch.zeros(1, dtype=torch.int64)  # Adam updates rows of [K, T, D]; here K = 1
    state = st

    def step(it: int) -> float:
        x0, noise, sigma = _batch(s, it, latents, sigma_table)
        ctx = state.params.clone().requires_grad_(True)  # [1, T, D]: the only tensor that gets a gradient
        loss = denoising_loss(predict_noise, x0, noise, sigma, ctx.expand(s.batch_size, -1, -1))
        if s.prompt_weight:
            loss = loss + s.prompt_weight * ((ctx[0] - original) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, ctx)
        with torch.no_grad():
            adam_update(state, rows, grad.detach(), s.learning_rate)
        return float(loss.detach())

    save = functools.partial(_save_checkpoint, ckpt, state, template) if ckpt is not None else None
    run_iterations(state, s.iterations, step, checkpoint_every=s.checkpoint_every, save=save, progress=progress,
                   check_cancel=check_cancel, label="seed-invariant prompt", error=SeedInvariantError,
                   advice=f"lower the learning rate (now {s.learning_rate}).")

    tuned = st.params[0].detach()
    steps = held_out_timesteps(s)
    held: dict[str, Any] = {"seeds": [int(x) for x in held_out_seeds], "timesteps": steps}
    if held_out_seeds:
        held["before"] = held_out_loss(latents, original, predict_noise, sigmas, held_out_seeds, steps)
        held["after"] = held_out_loss(latents, tuned, predict_noise, sigmas, held_out_seeds, steps)
    return dataclasses.replace(template, tokens=tuned.cpu(), iterations_done=st.iteration,
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
