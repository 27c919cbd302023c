"""The training machinery both loops share (noisequery_core/training.py): settings base, per-iteration randomness,
the resumable Adam state, and the loop's checkpoints on schedule, on a stop and never on divergence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from noisequery_core.errors import Cancelled, NoiseQueryError
from noisequery_core.exploration.invariant import InvariantSettings
from noisequery_core.training import (
    AdamState,
    RunSettings,
    adam_update,
    checkpoint_path_for,
    iteration_generator,
    run_iterations,
)


def Demo(**kw: object) -> InvariantSettings:  # noqa: N802  (reads as the settings class it builds)
    """A RunSettings subclass as the loops use them (the seed-invariant prompt's: floats learning_rate and
    prompt_weight)."""
    base: dict[str, object] = dict(iterations=10, learning_rate=0.1, prompt_weight=1.0, checkpoint_every=3)
    base.update(kw)
    return InvariantSettings(**base)  # type: ignore[arg-type]


def test_settings_round_trip_and_same_run() -> None:
    s = Demo(prompt_weight=2.0)
    assert isinstance(s, RunSettings)
    assert InvariantSettings.from_dict({**s.to_dict(), "unknown": 1}) == s
    assert InvariantSettings.from_dict({}) == InvariantSettings()
    # a resumed run may extend iterations and change checkpoint_every, nothing else
    assert s.same_run(Demo(prompt_weight=2.0, iterations=50, checkpoint_every=1)) == []
    assert s.same_run(Demo(prompt_weight=3.0, seed=4)) == ["prompt_weight 3.0 -> 2.0", "seed 4 -> 0"]


@pytest.mark.parametrize("kw, words", [
    (dict(prompt_weight=float("nan")), "prompt_weight is NaN"),
    (dict(learning_rate=0.0), "learning_rate 0.0 must be > 0"),
    (dict(t_min=9, t_max=3), "timestep range 9..3"),
    (dict(t_max=1000), "t_max 1000 is past the model's last timestep 999"),
    (dict(checkpoint_every=0), "checkpoint_every 0"),
])
def test_common_problems_name_the_setting(kw: dict[str, object], words: str) -> None:
    problems = Demo(**kw).common_problems(schedule_length=1000)  # type: ignore[arg-type]
    assert problems and words in problems[0], problems
    assert Demo().common_problems(schedule_length=1000) == []
    assert Demo(prompt_weight=float("inf")).float_problems() == ["setting prompt_weight is +infinity"]


def test_iteration_generators_are_reproducible_and_independent() -> None:
    a = torch.randn(4, generator=iteration_generator(7, 3))
    assert torch.equal(a, torch.randn(4, generator=iteration_generator(7, 3)))
    assert not torch.equal(a, torch.randn(4, generator=iteration_generator(7, 4)))
    assert not torch.equal(a, torch.randn(4, generator=iteration_generator(8, 3)))


def test_adam_updates_only_the_sampled_rows_and_restores() -> None:
    st = AdamState.fresh(torch.zeros(3, 2), torch.zeros(3, 5))
    rows = torch.tensor([0, 2])
    adam_update(st, rows, torch.ones(2, 2), 0.1, torch.ones(2, 5))
    assert st.steps.tolist() == [1, 0, 1]
    assert torch.equal(st.params[1], torch.zeros(2)) and st.pooled is not None and torch.equal(st.pooled[1], torch.zeros(5))
    assert torch.allclose(st.params[0], torch.full((2,), -0.1))  # Adam's first step: lr · sign(grad)
    saved = st.tensors()
    assert set(saved) == {"adam_m", "adam_v", "adam_steps", "adam_pooled_m", "adam_pooled_v"}
    assert AdamState.missing(saved, pooled=True) is None
    assert AdamState.missing({"adam_m": st.m}, pooled=False) == "adam_v"
    back = AdamState.restore(st.params, saved, 1, [0.5], torch.device("cpu"), st.pooled)
    adam_update(st, rows, torch.ones(2, 2), 0.1, torch.ones(2, 5))
    adam_update(back, rows, torch.ones(2, 2), 0.1, torch.ones(2, 5))
    assert torch.equal(st.params, back.params) and back.pooled is not None and torch.equal(st.pooled, back.pooled)


class Boom(NoiseQueryError):
    pass


def _loop(st: AdamState, total: int, losses: dict[int, float], saves: list[int], **kw: object) -> None:
    def step(it: int) -> float:
        st.params += 1
        return losses.get(it, 1.0)

    def save() -> Path:
        saves.append(st.iteration)
        return Path("x.safetensors.checkpoint")

    run_iterations(st, total, step, checkpoint_every=3, save=save, label="demo", error=Boom,
                   advice="lower it.", **kw)  # type: ignore[arg-type]


def test_loop_checkpoints_on_schedule_at_the_end_and_on_a_stop() -> None:
    st, saves, seen = AdamState.fresh(torch.zeros(1)), [], []
    _loop(st, 7, {}, saves, progress=lambda d, t, m="": seen.append((d, m)), check_cancel=lambda: None)
    assert saves == [3, 6, 7] and st.iteration == 7 and len(st.losses) == 7
    assert seen[0] == (0, "") and seen[-1] == (7, "loss 1.0000")

    st, saves = AdamState.fresh(torch.zeros(1)), []

    def progress(done: int, total: int, message: str = "") -> None:
        if done == 4:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        _loop(st, 7, {}, saves, progress=progress, check_cancel=lambda: None)
    assert saves == [3, 4] and st.iteration == 4  # the stop wrote the finished iterations


def test_loop_refuses_a_non_finite_loss_without_checkpointing_it() -> None:
    st, saves = AdamState.fresh(torch.zeros(1)), []
    with pytest.raises(Boom, match=r"demo: the loss became nan at iteration 4; lower it\."):
        _loop(st, 7, {4: float("nan")}, saves, progress=lambda d, t, m="": None, check_cancel=lambda: None)
    assert saves == [3] and st.iteration == 4 and len(st.losses) == 4


def test_checkpoint_path() -> None:
    assert checkpoint_path_for("a/b.safetensors") == Path("a/b.safetensors.checkpoint")
    assert checkpoint_path_for("a/b") == Path("a/b.safetensors.checkpoint")
