"""Refine a starting noise by a metric: elitist hill climbing over slerp steps toward fresh seeds, replayable.

The walk (the search) starts from one noise, candidate 0 (typically a Noise Query hit, or where a Variation Explorer
walk stands). Each round renders ``batch`` candidates: the current noise slerped (explore.step_noise) toward the
noises of fresh seeds derived from (start seed, round, index), all at the round's strength. When the round's best
candidate scores strictly higher than the current noise, it becomes the current noise and its Pick is appended to
the history; otherwise nothing changes. So the current noise is always the best so far, never worse than the start.

The strength (step size) starts at ``strength`` and shrinks by a constant factor after every round without an
improvement, reaching ``min_strength`` after ``cycle`` failed rounds; once it would fall below that, it restarts at
``strength`` from the best noise (a restart that keeps the progress: the walk escapes a basin the small steps cannot
leave, without spending renders to climb back). A round with an improvement keeps its strength. Nothing depends on
the budget, so the search is anytime: a walk of budget N renders exactly the first N candidates of any longer walk
with the same settings, and reaches the same best score (an Interrupt after N renders leaves the budget-N result).

Why hill climbing and not simulated annealing (NoiseSearch found both beat random seed sampling at equal cost): the
budgets here are tens of renders, and annealing's accepted downhill moves are renders a walk this short seldom wins
back; an elitist walk's history is exactly its accepted moves, so the history replays straight to the best noise
with nothing else to store; and a round is one batched sampler call.

The history is the Variation Explorer's (explore.History, format ``noisequery.explore`` v1): the start seed and one
Pick per accepted move (with its fresh seed and strength). ``explore.replay_noise`` rebuilds the best noise from it
bit for bit, in this module, in the Refine node's replay mode, or in a Variation Explorer given the same seed.

The metric is one or more named parts (score_parts(renders) -> {name: raw values}). One part is used raw (a colour
share, a CLIP cosine, an aesthetic score: its own scale). Several parts are standardised with the mean and spread of
each over the first scored renders (candidate 0 and round 0), frozen for the rest of the walk, and added by weight:
weights count standard deviations, as in every NoiseQuery query. Frozen, so that the best never changes meaning.

Rendering and scoring are callables (the ComfyUI glue renders with the connected model, tests with a fake), so the
search is host-independent. Long work follows noisequery_core.work; a ``Cancelled`` raised by check_cancel, progress,
the renderer or the scorer ends the walk early and returns the best so far (``stopped``), unless candidate 0 itself
was not finished (then there is nothing to return and Cancelled propagates).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checks import finite
from ..errors import Cancelled, NoiseQueryError
from ..work import CheckCancel, Progress, never_cancel, no_progress
from .explore import STRENGTH_MAX, History, HistoryError, Pick, derive_seed, step_noise

CALIBRATION_KEY = "refine_metric"  # extra history key: a mixed metric's frozen {part: [center, scale]}
MAX_BUDGET = 4096
MAX_BATCH = 64
MAX_CYCLE = 64
WHAT = {"budget": "renders in all, the start included", "batch": "renders per round",
        "cycle": "failed rounds from strength down to min_strength"}

Render = Callable[[torch.Tensor], Sequence[Any]]
"""``render(noises [n, *shape]) -> n renders`` (anything the scorer understands, e.g. PIL images)."""
ScoreParts = Callable[[Sequence[Any]], Mapping[str, np.ndarray]]
"""``score_parts(renders) -> {part name: raw values [n]}``; higher is better for a positive weight."""


class RefineError(NoiseQueryError):
    """Refine settings or a metric that cannot drive the search (zero budget, NaN weights, empty metric)."""


@dataclass(frozen=True)
class RefineSettings:
    """How the walk searches. ``budget`` counts renders, candidate 0 (the start) included."""

    budget: int = 16
    batch: int = 4
    strength: float = 0.5
    min_strength: float = 0.05
    search_seed: int = 0  # another value, another walk from the same start (another set of fresh seeds)
    cycle: int = 4  # failed rounds from strength down to min_strength (then the step restarts)

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("budget", self.budget, 1, MAX_BUDGET), ("batch", self.batch, 1, MAX_BATCH),
                                    ("cycle", self.cycle, 2, MAX_CYCLE)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
                raise RefineError(f"refine {name} is {value!r}; use a whole number from {lo} to {hi} "
                                  f"({WHAT[name]}).")
        finite(self.strength, "refine strength", lo=1e-6, hi=STRENGTH_MAX, error=RefineError,
               fix=f"use a slerp factor above 0 and at most {STRENGTH_MAX:g} (0.3-0.6 explores, 0.1 polishes).")
        finite(self.min_strength, "refine min_strength", lo=1e-6, hi=float(self.strength), error=RefineError,
               fix=f"use a value above 0 and at most strength ({self.strength:g}).")


    @property
    def decay(self) -> float:
        """The strength factor after a round without improvement: strength -> min_strength over ``cycle`` rounds."""
        if self.min_strength >= self.strength:
            return 1.0
        return float((self.min_strength / self.strength) ** (1.0 / (self.cycle - 1)))


def derivation(search_seed: int) -> str:
    """The ``what`` of explore.derive_seed for a refine walk: kept apart from the explorer's own offers."""
    return f"refine/{int(search_seed)}"


@dataclass
class Metric:
    """Combines the raw parts into one score: raw when there is one part (sign of its weight), else frozen
    weighted z-scores."""

    weights: dict[str, float]
    center: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights:
            raise RefineError("the refine metric is empty: give it at least one part (a query term, a CLIP text or an "
                              "aesthetic head) with a weight other than 0.")
        for name, w in self.weights.items():
            finite(w, f"refine metric weight of {name!r}", error=RefineError)
        zero = [n for n, w in self.weights.items() if float(w) == 0.0]
        if zero:
            raise RefineError(f"refine metric part(s) {', '.join(map(repr, zero))} have weight 0; leave them out "
                              "or give them a weight.")

    @property
    def calibrated(self) -> bool:
        return len(self.weights) == 1 or bool(self.scale)

    def calibrate(self, parts: Mapping[str, np.ndarray]) -> None:
        """Freeze each part's mean and spread from these raw values (several parts only)."""
        if len(self.weights) == 1:
            return
        for name in self.weights:
            v = np.asarray(parts[name], np.float64)
            self.center[name] = float(v.mean())
            sd = float(v.std())
            # a part that did not vary over the first renders: count its raw units (a share, a cosine) as they are
            self.scale[name] = sd if sd > 1e-9 else 1.0

    def combine(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.weights if n not in parts]
        if missing:
            raise RefineError(f"the scorer gave no values for metric part(s) {', '.join(map(repr, missing))}.")
        if len(self.weights) == 1:  # raw values (a negative weight, e.g. a colour to avoid, flips them)
            name, w = next(iter(self.weights.items()))
            return float(np.sign(w)) * np.asarray(parts[name], np.float64)
        total: np.ndarray | None = None
        for name, w in self.weights.items():
            z = (np.asarray(parts[name], np.float64) - self.center.get(name, 0.0)) / self.scale.get(name, 1.0)
            total = w * z if total is None else total + w * z
        assert total is not None
        return total


@dataclass
class RefineResult:
    """The best noise found and how the walk got there.

    ``history`` holds the accepted moves only, so ``replay(start, history.picks)`` is ``best_noise`` bit for bit.
    ``scores`` is each render's score in render order (candidate 0 first); ``curve[i]`` the best after i+1 renders.
    """

    history: History
    best_noise: torch.Tensor
    best_render: Any
    best_score: float
    best_index: int  # position of the best render in render order (0 = the start)
    scores: list[float]
    curve: list[float]
    parts: dict[str, list[float]]  # raw values of each metric part, render order
    strengths: list[float]  # the strength of each round
    stopped: bool = False  # ended early by Cancelled (Interrupt): the best so far

    @property
    def start_score(self) -> float:
        return self.scores[0]

    @property
    def renders(self) -> int:
        return len(self.scores)

    @property
    def moves(self) -> int:
        return len(self.history.picks)

    def report(self, budget: int) -> str:
        head = (f"refine from seed {self.history.start_seed}: {self.renders}/{budget} renders, "
                f"{len(self.strengths)} round(s), {self.moves} accepted move(s)")
        lines = [head, f"start score {self.start_score:.5g} -> best {self.best_score:.5g} (render #{self.best_index})"]
        if self.stopped:
            lines.append("stopped by Interrupt: the best noise found so far is returned (its history replays it).")
        for name, values in self.parts.items():
            if self.best_index < len(values):
                lines.append(f"  {name}: start {values[0]:.5g}, best {values[self.best_index]:.5g}")
        return "\n".join(lines)


def history_json(history: History, metric: Metric) -> str:
    """The history as JSON, with a mixed metric's frozen calibration under CALIBRATION_KEY.

    Readers of the explorer's format ignore the extra key; a replay reads it back (restore_calibration) so the
    replayed render gets the score the walk gave it.
    """
    if len(metric.weights) == 1 or not metric.scale:
        return history.to_json()
    doc = json.loads(history.to_json())
    doc[CALIBRATION_KEY] = {n: [metric.center[n], metric.scale[n]] for n in metric.weights}
    return json.dumps(doc, separators=(",", ":"))


def restore_calibration(text: str, metric: Metric) -> bool:
    """Freeze ``metric`` with the calibration a history carries; False when it carries none for these parts.

    Raises HistoryError for a calibration that is not finite numbers with positive scales (a damaged history).
    """
    if len(metric.weights) == 1:
        return True
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False  # History.parse reports unreadable text
    cal = doc.get(CALIBRATION_KEY) if isinstance(doc, dict) else None
    if not isinstance(cal, dict) or set(cal) != set(metric.weights):
        return False
    center, scale = {}, {}
    fix = "the history is damaged; clear it to search again."
    for name, pair in cal.items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise HistoryError(f"refine history: the calibration of {name!r} is {pair!r}, not [center, scale]; {fix}")
        center[name] = finite(pair[0], f"refine history: the center of {name!r}", fix=fix, error=HistoryError)
        scale[name] = finite(pair[1], f"refine history: the scale of {name!r}", lo=1e-300, fix=fix,
                             error=HistoryError)
    metric.center, metric.scale = center, scale
    return True


def replay(start: torch.Tensor, picks: Sequence[Pick]) -> torch.Tensor:
    """``start`` after each pick (explore.step_noise), the way refine builds its candidates: bit for bit."""
    x = start
    for p in picks:
        x = step_noise(x, p)
    return x


def refine(start: torch.Tensor, history: History, render: Render, score_parts: ScoreParts, metric: Metric,
           settings: RefineSettings, *, progress: Progress = no_progress,
           check_cancel: CheckCancel = never_cancel) -> RefineResult:
    """Search around ``start`` for a noise that scores higher; never returns worse than ``start``.

    Args:
        start: the noise of candidate 0, one latent item [C, H, W] (``replay_noise(history, shape)`` for a seed).
        history: where ``start`` stands (a start seed, and picks already made, e.g. a Variation Explorer walk);
            the accepted moves are appended to it, and fresh seeds derive from its start seed.
        render: renders a batch of noises (called with at most ``settings.batch`` items; candidate 0 alone).
        score_parts: raw metric parts per render; ``metric`` combines them.
        progress: renders done out of the budget, with the best score as the message.
        check_cancel: called before every round; Cancelled from it (or from progress/render/score) stops the walk.

    Returns:
        RefineResult; ``stopped`` when a Cancelled ended it early.

    Raises:
        RefineError for a start that is not one finite latent item, or a metric giving NaN/wrong-length scores;
        Cancelled when stopped before candidate 0 was scored.
    """
    if start.ndim != 3:
        raise RefineError(f"refine needs one latent item [C, H, W] as its start, got shape {tuple(start.shape)}.")
    if not bool(torch.isfinite(start).all()):
        raise RefineError("the start noise holds NaN or infinite values; connect a seed or a NOISE that makes "
                          "finite noise.")
    budget = int(settings.budget)
    what = derivation(settings.search_seed)
    progress(0, budget, "rendering the start")
    check_cancel()
    renders0 = list(render(start[None]))
    parts0 = _checked_parts(score_parts(renders0), 1)

    state = _Walk(start, history, renders0[0], parts0, metric)
    strength = float(settings.strength)
    try:
        progress(1, budget, f"start score {state.best_score_text()}")
        round_index = 0
        while state.renders < budget:
            check_cancel()
            n = min(int(settings.batch), budget - state.renders)
            offers = [Pick(index=j, seed=derive_seed(history.start_seed, round_index, j, what), strength=strength)
                      for j in range(n)]
            noises = torch.stack([step_noise(state.current, p) for p in offers])
            renders = list(render(noises))
            if len(renders) != n:
                raise RefineError(f"the renderer returned {len(renders)} renders for {n} noises.")
            parts = _checked_parts(score_parts(renders), n)
            improved = state.offer(offers, noises, renders, parts, strength)
            round_index += 1
            if not improved:
                strength *= settings.decay
                if strength < float(settings.min_strength) * (1 - 1e-9):
                    strength = float(settings.strength)  # restart the step size from the best noise
            progress(state.renders, budget, f"best score {state.best_score_text()} after {state.renders} renders")
    except Cancelled:
        state.stopped = True
    return state.result()


def _checked_parts(parts: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    out = {}
    for name, values in parts.items():
        v = np.asarray(values, np.float64).reshape(-1)
        if v.shape[0] != n:
            raise RefineError(f"metric part {name!r} gave {v.shape[0]} values for {n} renders.")
        if not np.isfinite(v).all():
            raise RefineError(f"metric part {name!r} gave NaN or infinite scores ({v.tolist()}); check its inputs "
                              "(an empty image? a damaged aesthetic head?).")
        out[name] = v
    return out


class _Walk:
    """The walk's state: the current (= best) noise, its history, and everything scored so far."""

    def __init__(self, start: torch.Tensor, history: History, render0: Any, parts0: dict[str, np.ndarray],
                 metric: Metric):
        self.metric = metric
        self.current, self.history = start, history
        self.best_render = render0
        self.best_index = 0
        self.pending0 = parts0  # candidate 0's parts: scored once the metric is calibrated (with round 0)
        self.scores: list[float] = []
        self.curve: list[float] = []
        self.parts: dict[str, list[float]] = {k: [float(v[0])] for k, v in parts0.items()}
        self.strengths: list[float] = []
        self.stopped = False
        if metric.calibrated:
            self._record_start()

    @property
    def renders(self) -> int:
        return len(next(iter(self.parts.values()))) if self.parts else 0

    def _record_start(self) -> None:
        s0 = float(self.metric.combine(self.pending0)[0])
        self.scores, self.curve = [s0], [s0]

    def best_score_text(self) -> str:
        return f"{self.curve[-1]:.5g}" if self.curve else "(calibrating)"

    def offer(self, offers: list[Pick], noises: torch.Tensor, renders: list[Any], parts: dict[str, np.ndarray],
              strength: float) -> bool:
        """Score a round; move to its best candidate when that beats the current noise. True when it moved."""
        if not self.metric.calibrated:
            self.metric.calibrate({k: np.concatenate([self.pending0[k], parts[k]]) for k in self.pending0})
            self._record_start()
        scores = self.metric.combine(parts)
        for k, v in parts.items():
            self.parts.setdefault(k, []).extend(float(x) for x in v)
        self.strengths.append(strength)
        j = int(np.argmax(scores))  # ties: the first
        before = self.curve[-1]
        for s in scores:
            self.scores.append(float(s))
            self.curve.append(max(self.curve[-1], float(s)))
        if float(scores[j]) > before:  # strictly better: a tie keeps the older, shorter history
            self.current = noises[j].clone()
            self.history = self.history.with_pick(offers[j])
            self.best_render = renders[j]
            self.best_index = len(self.scores) - len(scores) + j
            return True
        return False

    def result(self) -> RefineResult:
        if not self.scores:  # stopped before round 0 calibrated a multi-part metric: candidate 0 is the best
            self.metric.calibrate(self.pending0)
            self._record_start()
        return RefineResult(self.history, self.current, self.best_render, self.curve[-1], self.best_index,
                            self.scores, self.curve, self.parts, self.strengths, self.stopped)
