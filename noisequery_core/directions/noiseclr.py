"""NoiseCLR (arXiv 2312.05390): learn K editing directions from unlabeled images, contrastively.

A direction is a short sequence of conditioning tokens in the denoiser's text-conditioning
context space ([T, D]: T tokens of the text encoder's output width D, 768 for SD1.x), plus, for
models that also take a pooled text vector (SDXL's ADM input, SD3's and Flux's adaLN ``y``), a
pooled part [P] trained with it. It is initialised from the empty prompt's encoding plus a
little noise, so at the start ε(x, d_k) ≈ ε(x, ∅). Training, per iteration:

    pick N images, K' of the K directions, one timestep and one noise per image;
    x_t = x_0 + σ_t·noise                        (the variance-exploding form ComfyUI samples in;
                                                  flow models inject their own, (1−σ)·x_0 + σ·noise)
    Δ_{n,k} = ε(x_t^n, d_k) − ε(x_t^n, ∅)        (the edit direction k makes to image n)
    loss = InfoNCE over the Δs: positives are the same direction on other images, negatives
           the other directions on the same image (cosine similarity of flattened Δ / τ).

Gradients reach the direction tokens (and pooled part) only; the denoiser is an injected callable
``predict_noise(x_t, sigma, context[, pooled]) -> eps`` and is never modified here. Anything
proportional to ε per image works as "eps" (a flow model's velocity, for one): the loss compares
edits by cosine, which a positive per-image factor does not change. Each iteration draws
its randomness from its own generator seeded by (seed, iteration), and the optimiser is a
plain Adam whose state is saved with the directions, so a run resumed from a checkpoint is
bit-for-bit the run that was never interrupted (on the same device): the machinery of
noisequery_core/training.py, shared with the seed-invariant prompt.

Files: a directions file is safetensors with tensors ``directions`` [K, T, D] (float32) and
``empty`` [T0, D] (the empty prompt's encoding, the ∅ of the formula, needed to apply them),
with a pooled part also ``pooled`` [K, P] and ``empty_pooled`` [P], and one metadata entry
``noiseclr`` holding JSON (format version, model family, names, base model identity, training
settings, loss history). Version 1 files (before families) read as family "sd", no pooled part. A checkpoint is the same file plus the Adam
tensors, written atomically every ``checkpoint_every`` iterations.
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

from ..checks import number_problem
from ..errors import NoiseCLRError
from ..tagged_file import TaggedFormat, meta_width, read_tagged, write_tagged

# CHECKPOINT_SUFFIX and checkpoint_path_for are re-exported: scripts and hosts import them from here.
from ..training import CHECKPOINT_SUFFIX as CHECKPOINT_SUFFIX
from ..training import (
    AdamState,
    AddNoise,
    PredictNoise,
    RunSettings,
    adam_update,
    iteration_generator,
    run_iterations,
)
from ..training import checkpoint_path_for as checkpoint_path_for
from ..work import CheckCancel, Progress, never_cancel, no_progress

log = logging.getLogger("noisequery")

FORMAT = "noisequery.noiseclr"
FORMAT_VERSION = 2  # 2: "family" and the optional pooled part; 1 (SD1.x/SD2.x only) is still read
META_KEY = "noiseclr"
# The family of a file written before families were recorded: NoiseCLR then trained SD1.x/SD2.x UNets only.
LEGACY_FAMILY = "sd"
FAMILY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_NAME_PART = 100  # characters per folder/file part of a directions name (+ suffixes stays < 255 bytes)
MAX_DIRECTIONS = 256
FLOAT_SETTINGS = ("learning_rate", "temperature", "init_noise")


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class TrainSettings(RunSettings):
    """Everything that decides a training run's result (saved in the file, compared on resume)."""

    FLOAT_SETTINGS = FLOAT_SETTINGS
    num_directions: int = 8
    directions_per_iteration: int = 4
    iterations: int = 500
    batch_size: int = 4
    learning_rate: float = 1e-3
    temperature: float = 0.5
    t_min: int = 100
    t_max: int = 900
    seed: int = 0
    token_count: int = 77
    init_noise: float = 0.05
    checkpoint_every: int = 50

    def validate(self, schedule_length: int | None = None, image_count: int | None = None) -> None:
        """Raise NoiseCLRError naming the first setting out of range."""
        problems = []
        if not 2 <= self.num_directions <= MAX_DIRECTIONS:
            problems.append(f"num_directions {self.num_directions} must be 2..{MAX_DIRECTIONS} (a contrast needs two "
                            f"directions).")
        if not 2 <= self.directions_per_iteration <= self.num_directions:
            problems.append(f"directions_per_iteration {self.directions_per_iteration} must be 2..num_directions "
                            f"({self.num_directions}).")
        if self.batch_size < 2:
            problems.append(f"batch_size {self.batch_size} must be at least 2 (positives are the same direction on "
                            f"two images).")
        if self.iterations < 0:
            problems.append(f"iterations {self.iterations} must be >= 0.")
        problems += self.common_problems(schedule_length)
        if number_problem(self.temperature, lo=0.0) is None and not self.temperature > 0:
            problems.append(f"temperature {self.temperature} must be > 0.")
        if self.token_count < 1:
            problems.append(f"token_count {self.token_count} must be >= 1.")
        if image_count is not None and image_count < 2:
            problems.append(f"{image_count} training image(s): NoiseCLR needs at least 2 (ideally 20-100 of one "
                            f"domain).")
        if problems:
            raise NoiseCLRError(f"NoiseCLR settings: {problems[0]}")


# ------------------------------------------------------------------ the loss


def contrastive_loss(deltas: torch.Tensor, temperature: float) -> torch.Tensor:
    """NoiseCLR's contrastive loss on edits ``deltas`` [N images, K directions, ...].

    For anchor (n, k): positives are Δ_{m,k} for the other images m ≠ n, negatives are Δ_{n,l}
    for the other directions l ≠ k on the same image. With s = cos(·,·)/τ, the loss is the
    multi-positive InfoNCE  −log( Σ_pos e^s / (Σ_pos e^s + Σ_neg e^s) ), averaged over anchors
    (the paper's ratio of positive to negative terms, normalised so that it is ≥ 0).

    Raises NoiseCLRError when N < 2 or K < 2 (no positive or no negative pair exists).
    """
    if deltas.dim() < 3:
        raise NoiseCLRError(f"contrastive_loss: deltas must be [N, K, ...], got shape {tuple(deltas.shape)}.")
    n, k = deltas.shape[0], deltas.shape[1]
    if n < 2 or k < 2:
        raise NoiseCLRError(f"contrastive_loss: needs at least 2 images and 2 directions, got {n} and {k}.")
    z = torch.nn.functional.normalize(deltas.reshape(n, k, -1).float(), dim=-1)
    # pos[k, n, m] = cos(Δ_{n,k}, Δ_{m,k});  neg[n, k, l] = cos(Δ_{n,k}, Δ_{n,l})
    pos = torch.einsum("nkf,mkf->knm", z, z) / temperature
    neg = torch.einsum("nkf,nlf->nkl", z, z) / temperature
    eye_n = torch.eye(n, dtype=torch.bool, device=z.device)
    eye_k = torch.eye(k, dtype=torch.bool, device=z.device)
    pos = pos.masked_fill(eye_n, float("-inf")).permute(1, 0, 2)  # [n, k, m]
    neg = neg.masked_fill(eye_k, float("-inf"))  # [n, k, l]
    lse_pos = torch.logsumexp(pos, dim=-1)
    lse_all = torch.logsumexp(torch.cat([pos, neg], dim=-1), dim=-1)
    return (lse_all - lse_pos).mean()


# ------------------------------------------------------------------ the directions file


@dataclass
class Directions:
    """K learned directions plus what is needed to apply them and to know where they came from.

    ``family`` names the model family the directions belong to (the host's word: "sd", "sdxl", "sd3",
    "flux"); ``pooled``/``empty_pooled`` are the pooled part and the empty prompt's pooled vector, both
    present or both None.
    """

    directions: torch.Tensor  # [K, T, D] float32
    empty: torch.Tensor  # [T0, D] float32: the empty prompt's encoding (ε(x, ∅))
    names: list[str] = field(default_factory=list)
    base_model: dict[str, Any] = field(default_factory=dict)  # {"name", "fingerprint", "model_class", "context_dim"}
    settings: TrainSettings = field(default_factory=TrainSettings)
    iterations_done: int = 0
    loss_history: list[float] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # {"images": n, "fingerprint": ...}
    created: str = ""
    pooled: torch.Tensor | None = None  # [K, P] float32: each direction's pooled text vector
    empty_pooled: torch.Tensor | None = None  # [P] float32: the empty prompt's pooled vector
    family: str = LEGACY_FAMILY

    def __post_init__(self) -> None:
        if self.directions.dim() != 3:
            raise NoiseCLRError(f"directions must be [K, T, D], got shape {tuple(self.directions.shape)}.")
        if self.empty.dim() != 2 or self.empty.shape[1] != self.directions.shape[2]:
            raise NoiseCLRError(
                f"empty-prompt encoding {tuple(self.empty.shape)} does not match the directions' width "
                f"{self.directions.shape[2]}.")
        k = self.directions.shape[0]
        if (self.pooled is None) != (self.empty_pooled is None):
            raise NoiseCLRError("a pooled part needs both the directions' pooled vectors and the empty prompt's "
                                "(pooled and empty_pooled); one of them is missing.")
        if self.pooled is not None and self.empty_pooled is not None:
            if (self.pooled.dim() != 2 or self.pooled.shape[0] != k or self.empty_pooled.dim() != 1
                    or self.empty_pooled.shape[0] != self.pooled.shape[1]):
                raise NoiseCLRError(f"pooled part {tuple(self.pooled.shape)} / empty pooled "
                                    f"{tuple(self.empty_pooled.shape)} do not fit {k} directions: expected [K, P] and [P].")
        if not self.family or len(self.family) > 32 or not set(self.family) <= FAMILY_CHARS:
            raise NoiseCLRError(f"model family {self.family[:40]!r} is not a family name (lower-case letters, digits, "
                                "'.', '_' or '-').")
        if not self.names:
            self.names = [f"direction {i}" for i in range(k)]
        if len(self.names) != k:
            raise NoiseCLRError(f"{len(self.names)} names for {k} directions.")

    @property
    def count(self) -> int:
        return int(self.directions.shape[0])

    @property
    def token_count(self) -> int:
        return int(self.directions.shape[1])

    @property
    def context_dim(self) -> int:
        return int(self.directions.shape[2])

    @property
    def pooled_dim(self) -> int:
        """P, the width of the pooled part; 0 when the directions have none."""
        return 0 if self.pooled is None else int(self.pooled.shape[1])

    def meta(self, kind: str = "directions", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        m = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "family": self.family,
            "pooled_dim": self.pooled_dim,
            "names": list(self.names),
            "token_count": self.token_count,
            "context_dim": self.context_dim,
            "base_model": dict(self.base_model),
            "settings": self.settings.to_dict(),
            "iterations_done": int(self.iterations_done),
            "loss_history": [float(x) for x in self.loss_history],
            "data": dict(self.data),
            "created": self.created,
        }
        m.update(extra or {})
        return m


def save_directions(path: str | Path, d: Directions, *, kind: str = "directions",
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``d`` as a directions file (atomically: readers see the old file or the new one)."""
    tensors = {"directions": d.directions.detach().to("cpu", torch.float32),
               "empty": d.empty.detach().to("cpu", torch.float32)}
    if d.pooled is not None and d.empty_pooled is not None:
        tensors["pooled"] = d.pooled.detach().to("cpu", torch.float32)
        tensors["empty_pooled"] = d.empty_pooled.detach().to("cpu", torch.float32)
    tensors.update(extra_tensors or {})
    return write_tagged(path, tensors, d.meta(kind, extra_meta), META_KEY)


_FILE = TaggedFormat(
    META_KEY, FORMAT, FORMAT_VERSION, what="NoiseCLR directions file", meta_label="NoiseCLR",
    missing="Train directions first, or pick another file from models/noiseclr_directions.",
    redo="Train the directions again (or resume from an intact checkpoint).", error=NoiseCLRError,
    bounded=("directions", "empty", "pooled", "empty_pooled"))  # text encodings: bounded like one


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = read_tagged(path, _FILE)
    pooled_dim = meta_width(meta, "pooled_dim", path, _FILE)
    for name in ["directions", "empty"] + (["pooled", "empty_pooled"] if pooled_dim else []):
        if name not in tensors:
            raise NoiseCLRError(f"{path}: tensor {name!r} is missing; the file is damaged.")
    return tensors, meta


def load_directions(path: str | Path) -> Directions:
    """Read a directions (or checkpoint) file; raises NoiseCLRError saying what is wrong with it."""
    path = Path(path)
    tensors, meta = _read(path)
    try:
        pooled_dim = int(meta.get("pooled_dim", 0))
        family = meta.get("family", LEGACY_FAMILY)  # version 1: SD1.x/SD2.x was the only family trained
        if not isinstance(family, str):
            raise NoiseCLRError(f"family {family!r} is not a name; the file's metadata is damaged.")
        settings = TrainSettings.from_dict(dict(meta.get("settings") or {}))
        for problem in settings.float_problems():
            raise NoiseCLRError(f"{problem}; the file's metadata is damaged. Train the directions again.")
        return Directions(
            directions=tensors["directions"].float(),
            empty=tensors["empty"].float(),
            names=[str(n) for n in meta.get("names") or []],
            base_model=dict(meta.get("base_model") or {}),
            settings=settings,
            iterations_done=int(meta.get("iterations_done", 0)),
            loss_history=[float(x) for x in meta.get("loss_history") or []],
            data=dict(meta.get("data") or {}),
            created=str(meta.get("created", "")),
            pooled=_pooled_tensor(tensors, pooled_dim),
            empty_pooled=tensors["empty_pooled"].float() if pooled_dim else None,
            family=family,
        )
    except NoiseCLRError as exc:
        raise NoiseCLRError(f"{path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise NoiseCLRError(f"{path}: malformed NoiseCLR metadata ({exc}); the file is damaged.") from exc


def _pooled_tensor(tensors: dict[str, torch.Tensor], pooled_dim: int) -> torch.Tensor | None:
    if not pooled_dim:
        return None
    pooled = tensors["pooled"].float()
    if pooled.dim() != 2 or pooled.shape[1] != pooled_dim:
        raise NoiseCLRError(f"tensor 'pooled' has shape {tuple(pooled.shape)}, but the metadata says the pooled part is "
                            f"{pooled_dim} wide; the file is damaged.")
    return pooled


def rename_directions(path: str | Path, names: dict[int, str]) -> Directions:
    """Give directions of an existing file new names ({index: name}); rewrites it atomically."""
    d = load_directions(path)
    for i, name in names.items():
        if not 0 <= i < d.count:
            raise NoiseCLRError(f"{path}: no direction {i} (the file has 0..{d.count - 1}).")
        d.names[i] = name.strip() or d.names[i]
    save_directions(path, d)
    return d


def parse_names(text: str, count: int | None = None) -> dict[int, str]:
    """'0=smile, 3=old age' or 'smile, , old age' (by position) -> {index: name}."""
    out: dict[int, str] = {}
    parts = [p.strip() for p in text.replace("\n", ",").split(",")]
    if any("=" in p for p in parts):
        for p in parts:
            if not p:
                continue
            key, sep, value = p.partition("=")
            if not sep or not key.strip().isdigit():
                raise NoiseCLRError(f"names: {p!r} is not 'index=name' (write e.g. '0=smile, 3=old age').")
            out[int(key)] = value.strip()
    else:
        out = {i: p for i, p in enumerate(parts) if p}
    if count is not None:
        for i in out:
            if not 0 <= i < count:
                raise NoiseCLRError(f"names: index {i} is outside 0..{count - 1}.")
    return out


def check_directions_name(name: str) -> str:
    """A directions name without ``.safetensors``, or NoiseCLRError saying why it cannot be a file name."""
    clean = name.strip()
    if clean.endswith(".safetensors"):
        clean = clean[: -len(".safetensors")]
    if "\x00" in clean:
        raise NoiseCLRError(f"name {name!r} contains a NUL character; use a plain file name like 'faces_8'.")
    parts = clean.replace("\\", "/").split("/")
    if not clean or any(not p for p in parts):
        raise NoiseCLRError(f"name {name!r}: use a plain file name like 'faces_8' (sub-folders with '/' are fine).")
    for p in parts:
        if len(p) > MAX_NAME_PART:
            raise NoiseCLRError(f"name {name[:40]!r}…: the part {p[:20]!r}… has {len(p)} characters; at most "
                                f"{MAX_NAME_PART} are allowed (the file system limits file names).")
    return clean


# ------------------------------------------------------------------ training


def _init_state(empty: torch.Tensor, s: TrainSettings, device: torch.device,
                empty_pooled: torch.Tensor | None = None) -> AdamState:
    t0, dim = empty.shape
    if s.token_count > t0:
        raise NoiseCLRError(f"token_count {s.token_count} is more than the empty prompt's {t0} tokens; use <= {t0}.")
    g = torch.Generator(device="cpu").manual_seed(int(s.seed) & (2**63 - 1))
    base = empty[: s.token_count].to("cpu", torch.float32)
    scale = float(base.std()) * s.init_noise
    noise = torch.randn((s.num_directions, s.token_count, dim), generator=g) * scale
    params = (base.unsqueeze(0) + noise).to(device)
    pooled = None
    if empty_pooled is not None:
        # Drawn after the tokens' noise, so directions without a pooled part start exactly as they always did.
        pbase = empty_pooled.to("cpu", torch.float32)
        pnoise = torch.randn((s.num_directions, pbase.shape[0]), generator=g) * (float(pbase.std()) * s.init_noise)
        pooled = (pbase.unsqueeze(0) + pnoise).to(device)
    return AdamState.fresh(params, pooled)


def _save_checkpoint(path: Path, st: AdamState, template: Directions) -> Path:
    d = dataclasses.replace(template, directions=st.params, pooled=st.pooled, iterations_done=st.iteration,
                            loss_history=list(st.losses))
    return save_directions(path, d, kind="checkpoint", extra_tensors=st.tensors())


def _load_checkpoint(path: Path, template: Directions, device: torch.device) -> AdamState:
    tensors, _ = _read(path)
    got = load_directions(path)
    diffs = template.settings.same_run(got.settings)
    if diffs:
        raise NoiseCLRError(f"checkpoint {path} belongs to a run with other settings ({'; '.join(diffs)}). Put the "
                            f"settings back, train under another name, or turn resume off to start over.")
    if got.family != template.family:
        raise NoiseCLRError(f"checkpoint {path} was trained on the {got.family} family, this run is {template.family}. "
                            f"Connect the same model, train under another name, or turn resume off to start over.")
    for key, what in (("fingerprint", "base model"),):
        a, b = template.base_model.get(key), got.base_model.get(key)
        if a and a != b:
            raise NoiseCLRError(f"checkpoint {path} was trained on another {what} ({b}, now {a}). Connect the same "
                                f"model, train under another name, or turn resume off to start over.")
    a, b = template.data.get("fingerprint"), got.data.get("fingerprint")
    if a and a != b:
        raise NoiseCLRError(f"checkpoint {path} was trained on other images (data {b}, now {a}). Use the same images, "
                            f"train under another name, or turn resume off to start over.")
    if got.directions.shape != (template.settings.num_directions, template.settings.token_count,
                                template.empty.shape[1]):
        raise NoiseCLRError(f"checkpoint {path} holds directions of shape {tuple(got.directions.shape)}, which does not "
                            f"fit these settings; turn resume off to start over.")
    if got.pooled_dim != template.pooled_dim:
        raise NoiseCLRError(f"checkpoint {path} has a pooled part {got.pooled_dim} wide, this run needs "
                            f"{template.pooled_dim}; turn resume off to start over.")
    name = AdamState.missing(tensors, pooled=bool(template.pooled_dim))
    if name is not None:
        raise NoiseCLRError(f"{path} has no optimiser state ({name}); it is a finished directions file, not a "
                            f"checkpoint. Turn resume off to start over.")
    return AdamState.restore(got.directions, tensors, got.iterations_done, got.loss_history, device, got.pooled)


def _batch(s: TrainSettings, it: int, latents: torch.Tensor, sigma_table: torch.Tensor, k_all: int, n: int,
           k: int, add_noise: AddNoise | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s sampled direction rows, noised images x_t and their sigmas."""
    g = iteration_generator(s.seed, it)
    img = torch.randperm(latents.shape[0], generator=g)[:n]
    rows = torch.randperm(k_all, generator=g)[:k].sort().values
    t = torch.randint(s.t_min, s.t_max + 1, (n,), generator=g)
    noise = torch.randn((n, *latents.shape[1:]), generator=g).to(latents.device)
    sigma = sigma_table[t].to(latents.device)
    if add_noise is None:
        x_t = latents[img] + noise * sigma.view(-1, *([1] * (latents.dim() - 1)))
    else:
        x_t = add_noise(latents[img], noise, sigma)
    return rows, x_t, sigma


def _deltas(predict_noise: PredictNoise, x_t: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor,
            eps0: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K', ...] edits of the directions ``ctx`` [K', T, D] (and pooled parts [K', P]) on x_t, in one
    batched call (row j*N + i is image i under direction j)."""
    k, n = ctx.shape[0], x_t.shape[0]
    args = [x_t.repeat(k, *([1] * (x_t.dim() - 1))), sigma.repeat(k), ctx.repeat_interleave(n, dim=0)]
    if pooled is not None:
        args.append(pooled.repeat_interleave(n, dim=0))
    eps = predict_noise(*args).float()
    return (eps.reshape(k, n, -1) - eps0.reshape(1, n, -1)).transpose(0, 1)


def _eps_empty(predict_noise: PredictNoise, x_t: torch.Tensor, sigma: torch.Tensor, empty: torch.Tensor,
               empty_pooled: torch.Tensor | None) -> torch.Tensor:
    """ε(x_t, ∅) for the N images (no gradient: ∅ is fixed)."""
    n = x_t.shape[0]
    args = [x_t, sigma, empty.unsqueeze(0).expand(n, -1, -1)]
    if empty_pooled is not None:
        args.append(empty_pooled.unsqueeze(0).expand(n, -1))
    with torch.no_grad():
        return predict_noise(*args).float()


def evaluate_loss(latents: torch.Tensor, empty: torch.Tensor, predict_noise: PredictNoise, sigmas: torch.Tensor,
                  settings: TrainSettings, directions: torch.Tensor, iterations: Sequence[int], *,
                  pooled: torch.Tensor | None = None, empty_pooled: torch.Tensor | None = None,
                  add_noise: AddNoise | None = None) -> float:
    """Mean contrastive loss of ``directions`` [K, T, D] on the batches training draws at ``iterations``.

    The same images, timesteps, noise and direction subsets for any directions, so the loss of the
    initial and of the trained directions can be compared without sampling noise. ``pooled`` [K, P]
    and ``empty_pooled`` [P] go together (models with a pooled input); ``add_noise`` as in training.
    """
    s = settings
    dev = latents.device
    sigma_table = sigmas.detach().to("cpu", torch.float32)
    n = min(s.batch_size, latents.shape[0])
    if (pooled is None) != (empty_pooled is None):
        raise NoiseCLRError("evaluate_loss: pass pooled and empty_pooled together (or neither).")
    ep = empty_pooled.to(dev).float() if empty_pooled is not None else None
    total = 0.0
    with torch.no_grad():
        for it in iterations:
            rows, x_t, sigma = _batch(s, it, latents.float(), sigma_table, directions.shape[0], n,
                                      s.directions_per_iteration, add_noise)
            eps0 = _eps_empty(predict_noise, x_t, sigma, empty.to(dev).float(), ep)
            rows_pooled = pooled[rows].to(dev).float() if pooled is not None else None
            delta = _deltas(predict_noise, x_t, sigma, directions[rows].to(dev).float(), eps0, rows_pooled)
            total += float(contrastive_loss(delta, s.temperature))
    return total / max(1, len(iterations))


def train_directions(
    latents: torch.Tensor,
    empty: torch.Tensor,
    predict_noise: PredictNoise,
    sigmas: torch.Tensor,
    settings: TrainSettings,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    base_model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    names: Sequence[str] = (),
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
    device: torch.device | str | None = None,
    empty_pooled: torch.Tensor | None = None,
    add_noise: AddNoise | None = None,
    family: str = LEGACY_FAMILY,
) -> Directions:
    """Learn ``settings.num_directions`` directions on ``latents`` with the NoiseCLR loss.

    Args:
        latents: [M, C, H, W] clean latents in the model's space (M >= 2 images of one domain).
        empty: [T0, D] the empty prompt's encoding (∅; the directions start from its first T tokens).
        predict_noise: ``(x_t [B,C,H,W], sigma [B], context [B,T,D]) -> eps [B,C,H,W]``, differentiable
            in ``context``; x_t = x_0 + sigma·noise (the callable scales its input as the model needs).
        sigmas: [L] the model's training noise levels by timestep (t_min..t_max index into it).
        settings: the run's TrainSettings.
        checkpoint_path: where to write a checkpoint every ``checkpoint_every`` iterations (and on cancel);
            None for no checkpoints.
        resume: continue from ``checkpoint_path`` when it exists (same settings, model and data), else start over.
        base_model / data: identity of the model and images, stored in the file and checked on resume.
        names: optional names of the directions.
        progress: ``progress(iterations done, total, "loss 1.2345")`` after each iteration (noisequery_core.work).
        check_cancel: called before each iteration; whatever it raises stops the run, after a checkpoint of
            the last finished iteration is written (when checkpoint_path is set), and propagates.
        device: where the directions live (default: latents' device).
        empty_pooled: [P] the empty prompt's pooled vector, for models that also take one (SDXL's ADM input,
            SD3/Flux ``y``): each direction then gains a pooled part [P], started from it and trained with the
            tokens, and ``predict_noise`` is called as ``(x_t, sigma, context, pooled [B, P])``.
        add_noise: ``(x_0, noise, sigma [N]) -> x_t`` in the model's sampling space (flow models:
            (1−σ)·x_0 + σ·noise); None for x_0 + σ·noise.
        family: the model family's name, stored in the file (checked on resume and when applying).

    Returns: the trained Directions (iterations_done == settings.iterations).
    Raises: NoiseCLRError for bad settings or a checkpoint that does not fit; whatever check_cancel raises.
    """
    s = settings
    s.validate(schedule_length=int(sigmas.shape[0]), image_count=int(latents.shape[0]))
    dev = torch.device(device) if device is not None else latents.device
    empty = empty.detach().to(dev, torch.float32)
    latents = latents.detach().to(dev, torch.float32)
    sigma_table = sigmas.detach().to("cpu", torch.float32)
    k_all = s.num_directions
    name_list = list(names)[:k_all] + [f"direction {i}" for i in range(len(list(names)[:k_all]), k_all)]
    ep = empty_pooled.detach().to(dev, torch.float32) if empty_pooled is not None else None
    if ep is not None and ep.dim() != 1:
        raise NoiseCLRError(f"empty_pooled must be one vector [P], got shape {tuple(ep.shape)}.")
    template = Directions(directions=torch.zeros(k_all, s.token_count, empty.shape[1]), empty=empty.cpu(),
                          names=name_list, base_model=dict(base_model or {}), settings=s,
                          data=dict(data or {}), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          pooled=torch.zeros(k_all, ep.shape[0]) if ep is not None else None,
                          empty_pooled=ep.cpu() if ep is not None else None, family=family)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None

    st: AdamState | None = None
    if ckpt is not None and resume and ckpt.is_file():
        st = _load_checkpoint(ckpt, template, dev)
        log.info("NoiseCLR: resuming %s at iteration %d of %d", ckpt, st.iteration, s.iterations)
    if st is None:
        st = _init_state(empty, s, dev, ep)

    n = min(s.batch_size, latents.shape[0])
    k = s.directions_per_iteration
    state = st

    def step(it: int) -> float:
        rows, x_t, sigma = _batch(s, it, latents, sigma_table, k_all, n, k, add_noise)
        eps0 = _eps_empty(predict_noise, x_t, sigma, empty, ep)
        ctx = state.params[rows].clone().requires_grad_(True)  # [k, T, D]
        pooled = state.pooled[rows].clone().requires_grad_(True) if state.pooled is not None else None  # [k, P]
        delta = _deltas(predict_noise, x_t, sigma, ctx, eps0, pooled)
        loss = contrastive_loss(delta, s.temperature)
        if pooled is None:
            (grad,) = torch.autograd.grad(loss, ctx)
            pooled_grad = None
        else:
            grad, pooled_grad = torch.autograd.grad(loss, (ctx, pooled))
        with torch.no_grad():
            adam_update(state, rows, grad.detach(), s.learning_rate,
                        pooled_grad.detach() if pooled_grad is not None else None)
        return float(loss.detach())

    save = functools.partial(_save_checkpoint, ckpt, state, template) if ckpt is not None else None
    run_iterations(state, s.iterations, step, checkpoint_every=s.checkpoint_every, save=save, progress=progress,
                   check_cancel=check_cancel, label="NoiseCLR", error=NoiseCLRError,
                   advice=f"lower the learning rate (now {s.learning_rate}) or raise the temperature (now "
                          f"{s.temperature}).")
    return dataclasses.replace(template, directions=st.params.detach().cpu(),
                               pooled=st.pooled.detach().cpu() if st.pooled is not None else None,
                               iterations_done=st.iteration, loss_history=list(st.losses))


def loss_summary(losses: Sequence[float], window: int = 10) -> str:
    """'loss 2.31 -> 1.87 (first/last 10 iterations)' for reports."""
    if not losses:
        return "no iterations run"
    w = max(1, min(window, len(losses) // 2 or 1))
    first = float(np.mean(losses[:w]))
    last = float(np.mean(losses[-w:]))
    return f"loss {first:.4f} -> {last:.4f} (mean of first/last {w} iterations of {len(losses)})"
