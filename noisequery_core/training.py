"""The resumable optimisation shared by the pack's training loops (NoiseCLR directions, seed-invariant prompts).

Both loops tune conditioning tensors through a frozen model with the same machinery, kept here once:

- ``RunSettings``: the base of a run's frozen settings (saved in its file, compared on resume) with the checks
  every run shares (learning rate, timestep range, checkpoint interval);
- ``iteration_generator``: each iteration draws its randomness from its own generator seeded by
  (seed, iteration), so resuming needs no RNG state;
- ``AdamState`` / ``adam_update``: a plain Adam over rows of the tuned tensor (and of an optional pooled part),
  whose moments and step counts are saved with the checkpoint;
- ``run_iterations``: the loop itself, with progress, cancel, a checkpoint every N iterations and one on a stop.

Together they make a run resumed from a checkpoint bit for bit the run that was never interrupted (on the same
device). Changing any constant or the order of an operation here changes the result of every saved run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from .checks import number_problem
from .errors import NoiseQueryError
from .work import CheckCancel, Progress

log = logging.getLogger("noisequery")

# (x_t, sigma, context) -> eps, or (x_t, sigma, context, pooled) -> eps for models that also take a pooled vector:
# the frozen model as the training loops see it (ComfyUI's is nodes/_training.make_predict_noise).
PredictNoise = Callable[..., torch.Tensor]
# (x_0, noise, sigma [N]) -> x_t in the model's sampling space; None = x_0 + sigma·noise.
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Adam constants (fixed: part of what makes a resumed run equal an uninterrupted one).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# A checkpoint is "<name>.safetensors.checkpoint": result files always end in ".safetensors", so no result name
# can collide with a checkpoint, and a folder listing of "*.safetensors" never shows one.
CHECKPOINT_SUFFIX = ".safetensors.checkpoint"
# Settings a resumed run may change: iterations (a finished run can be extended), checkpoint_every (no effect on
# the result).
RESUMABLE_CHANGES = frozenset({"iterations", "checkpoint_every"})

S = TypeVar("S", bound="RunSettings")


# ------------------------------------------------------------------ settings


class RunSettings:
    """Base of a training run's settings (a frozen dataclass subclass holds the fields).

    Every subclass has ``iterations``, ``learning_rate``, ``t_min``, ``t_max``, ``seed`` and ``checkpoint_every``;
    ``FLOAT_SETTINGS`` names its float fields (each must be finite and >= 0).
    """

    FLOAT_SETTINGS: ClassVar[tuple[str, ...]] = ("learning_rate",)
    iterations: int
    learning_rate: float
    t_min: int
    t_max: int
    seed: int
    checkpoint_every: int

    def common_problems(self, schedule_length: int | None = None) -> list[str]:
        """What is wrong with the settings every run shares (empty when nothing): finite non-negative floats, a
        positive learning rate, a timestep range inside the model's schedule, a checkpoint interval >= 1."""
        out = []
        for name in self.FLOAT_SETTINGS:
            problem = number_problem(getattr(self, name), lo=0.0)
            if problem is not None:
                out.append(f"{name} {problem}; use a finite number >= 0.")
        if not self.learning_rate > 0:
            out.append(f"learning_rate {self.learning_rate} must be > 0.")
        if not 0 <= self.t_min <= self.t_max:
            out.append(f"timestep range {self.t_min}..{self.t_max} is empty or negative; use 0 <= t_min <= t_max.")
        if schedule_length is not None and self.t_max >= schedule_length:
            out.append(f"t_max {self.t_max} is past the model's last timestep {schedule_length - 1}.")
        if self.checkpoint_every < 1:
            out.append(f"checkpoint_every {self.checkpoint_every} must be >= 1.")
        return out

    def float_problems(self) -> list[str]:
        """Float settings that are not finite (a file's metadata read back: NaN or inf means it is damaged)."""
        out = []
        for name in self.FLOAT_SETTINGS:
            problem = number_problem(getattr(self, name))
            if problem is not None:
                out.append(f"setting {name} {problem}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        """The settings in ``d`` (a file's metadata); unknown keys are ignored, missing ones take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})

    def same_run(self, other: RunSettings) -> list[str]:
        """Settings that differ between two runs ("name old -> new"), except those a resumed run may change."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k} {b[k]!r} -> {a[k]!r}" for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]


# ------------------------------------------------------------------ randomness and the optimiser


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """Independent, reproducible randomness for one iteration (so resuming needs no RNG state)."""
    mixed = np.random.SeedSequence([int(seed) & (2**64 - 1), int(iteration) + 1]).generate_state(2, np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


@dataclass
class AdamState:
    """What a run must save to resume: the tuned rows, Adam's moments and step counts, and the loop's position."""

    params: torch.Tensor  # [K, ...] float32: K rows, each updated only when sampled
    m: torch.Tensor
    v: torch.Tensor
    steps: torch.Tensor  # [K] int64: Adam steps taken per row
    iteration: int
    losses: list[float]
    pooled: torch.Tensor | None = None  # [K, P] float32: each row's pooled vector, own moments, same step counts
    pm: torch.Tensor | None = None
    pv: torch.Tensor | None = None

    @classmethod
    def fresh(cls, params: torch.Tensor, pooled: torch.Tensor | None = None) -> AdamState:
        """A run's start: zero moments and steps, no iterations done."""
        zeros = torch.zeros_like(params)
        st = cls(params, zeros.clone(), zeros.clone(), torch.zeros(params.shape[0], dtype=torch.int64), 0, [])
        if pooled is not None:
            st.pooled, st.pm, st.pv = pooled, torch.zeros_like(pooled), torch.zeros_like(pooled)
        return st

    def tensors(self) -> dict[str, torch.Tensor]:
        """The optimiser's tensors as a checkpoint stores them (names fixed: files written before read back)."""
        out = {"adam_m": self.m, "adam_v": self.v, "adam_steps": self.steps}
        if self.pm is not None and self.pv is not None:
            out.update({"adam_pooled_m": self.pm, "adam_pooled_v": self.pv})
        return out

    @staticmethod
    def missing(tensors: dict[str, torch.Tensor], pooled: bool) -> str | None:
        """The first optimiser tensor a checkpoint lacks (None when it has them all)."""
        names = ["adam_m", "adam_v", "adam_steps"] + (["adam_pooled_m", "adam_pooled_v"] if pooled else [])
        return next((n for n in names if n not in tensors), None)

    @classmethod
    def restore(cls, params: torch.Tensor, tensors: dict[str, torch.Tensor], iteration: int, losses: Sequence[float],
                device: torch.device, pooled: torch.Tensor | None = None) -> AdamState:
        """The state a checkpoint holds (``tensors`` as ``tensors()`` wrote them; check ``missing`` first)."""
        st = cls(params.to(device), tensors["adam_m"].float().to(device), tensors["adam_v"].float().to(device),
                 tensors["adam_steps"].to(torch.int64), iteration, list(losses))
        if pooled is not None:
            st.pooled = pooled.to(device)
            st.pm = tensors["adam_pooled_m"].float().to(device)
            st.pv = tensors["adam_pooled_v"].float().to(device)
        return st


def adam_update(state: AdamState, rows: torch.Tensor, grad: torch.Tensor, lr: float,
                pooled_grad: torch.Tensor | None = None) -> None:
    """Adam on the sampled rows only (rows not sampled this iteration keep state and value)."""
    state.steps[rows.cpu()] += 1
    t = state.steps[rows.cpu()].to(torch.float32)
    _adam_rows(state.params, state.m, state.v, rows, grad, t, lr)
    if pooled_grad is not None and state.pooled is not None and state.pm is not None and state.pv is not None:
        _adam_rows(state.pooled, state.pm, state.pv, rows, pooled_grad, t, lr)


def _adam_rows(params: torch.Tensor, m_all: torch.Tensor, v_all: torch.Tensor, rows: torch.Tensor,
               grad: torch.Tensor, t: torch.Tensor, lr: float) -> None:
    b1, b2 = ADAM_BETAS
    t = t.to(grad.device).view(-1, *([1] * (grad.dim() - 1)))
    rows = rows.to(grad.device)
    m = m_all[rows] * b1 + grad * (1 - b1)
    v = v_all[rows] * b2 + grad * grad * (1 - b2)
    m_all[rows] = m
    v_all[rows] = v
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    params[rows] = params[rows] - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)


# ------------------------------------------------------------------ the loop


def loss_message(loss: float) -> str:
    """The progress message of an iteration (kept in this one place: hosts show it as is)."""
    return f"loss {loss:.4f}"


@contextlib.contextmanager
def checkpoint_on_stop(save: Callable[[], Path] | None, state: AdamState, label: str) -> Iterator[None]:
    """Around a host callback (check_cancel, progress): if it raises, checkpoint the finished iterations first."""
    try:
        yield
    except BaseException:
        if save is not None:
            path = save()
            log.info("%s: stopped after iteration %d; checkpoint %s", label, state.iteration, path)
        raise


def run_iterations(state: AdamState, total: int, step: Callable[[int], float], *, checkpoint_every: int,
                   save: Callable[[], Path] | None, progress: Progress, check_cancel: CheckCancel, label: str,
                   error: type[NoiseQueryError], advice: str) -> None:
    """Run iterations ``state.iteration`` .. ``total - 1`` of a training loop.

    ``step(it)`` runs iteration ``it`` (forward, backward, the Adam update of ``state``) and returns its loss. After
    each, the loss is recorded, a checkpoint is written by ``save()`` every ``checkpoint_every`` iterations and at
    the end, and ``progress`` is told. ``check_cancel`` is called before each iteration; when it or ``progress``
    raises, ``save()`` writes the finished iterations first and the exception propagates. A non-finite loss raises
    ``error`` ("<label>: the loss became nan at iteration 7; <advice>"). ``save`` None: no checkpoints.
    """
    progress(min(state.iteration, total), total, loss_message(state.losses[-1]) if state.losses else "")
    while state.iteration < total:
        it = state.iteration
        with checkpoint_on_stop(save, state, label):
            check_cancel()
        value = step(it)
        if not math.isfinite(value):
            raise error(f"{label}: the loss became {value} at iteration {it}; {advice}")
        state.losses.append(value)
        state.iteration = it + 1
        if save is not None and (state.iteration % checkpoint_every == 0 or state.iteration == total):
            save()
        with checkpoint_on_stop(save, state, label):  # a progress hook may raise too (ComfyUI's interrupt)
            progress(state.iteration, total, loss_message(value))


# ------------------------------------------------------------------ files


def checkpoint_path_for(path: str | Path) -> Path:
    """Where the resumable checkpoint of result file ``path`` lives (same folder, ``CHECKPOINT_SUFFIX``)."""
    p = Path(path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(stem + CHECKPOINT_SUFFIX)


def data_fingerprint(arrays: Sequence[np.ndarray]) -> str:
    """A short hash of the training images (uint8 pixels), to refuse resuming on other data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
