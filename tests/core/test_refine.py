"""Refine search (noisequery_core.exploration.refine) with a fake renderer: monotone best, never worse than the start,
budget respected, Interrupt keeps the best, bit-for-bit replay; the render metrics (refine_metric) on synthetic images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from noisequery_core.errors import Cancelled, NoiseQueryError
from noisequery_core.exploration.explore import History, Pick, replay_noise
from noisequery_core.exploration.refine import Metric, RefineError, RefineSettings, refine, replay
from noisequery_core.exploration.refine_metric import MetricSpec, build_metric, curve_image, query_terms
from noisequery_core.noise import seed_noise
from noisequery_core.search.query import Query, RegionTarget, StatTarget

SHAPE = (4, 8, 8)
TARGET = seed_noise(999, SHAPE)


class FakeRenderer:
    """A "render" is the noise itself; counts calls and items."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, noises: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append(int(noises.shape[0]))
        return [n.clone() for n in noises]


def cosine_parts(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Cosine of each noise to a fixed target: a landscape where steps toward some fresh seeds do better."""
    t = TARGET.flatten().double()
    return {"cos": np.array([float(torch.nn.functional.cosine_similarity(r.flatten().double(), t, dim=0))
                             for r in renders])}


def start_of(seed: int) -> tuple[torch.Tensor, History]:
    h = History(seed)
    return replay_noise(h, SHAPE), h


def run(seed: int = 5, **kw: object) -> tuple[object, FakeRenderer]:
    start, h = start_of(seed)
    r = FakeRenderer()
    settings = RefineSettings(**{"budget": 17, "batch": 4, **kw})  # type: ignore[arg-type]
    return refine(start, h, r, cosine_parts, Metric({"cos": 1.0}), settings), r


def test_best_is_monotone_and_never_worse_than_the_start() -> None:
    res, _ = run()
    curve = res.curve
    assert all(b >= a for a, b in zip(curve, curve[1:])), curve
    assert res.best_score == max(res.scores) == curve[-1]
    assert res.best_score > res.start_score, "a cosine landscape has better neighbours: the walk should find one"
    assert res.moves >= 1 and res.best_index > 0
    # the best noise scores what the walk says it scores
    assert cosine_parts([res.best_noise])["cos"][0] == pytest.approx(res.best_score, abs=1e-12)


def test_a_start_at_the_optimum_is_returned_unchanged() -> None:
    start, h = start_of(5)

    def closeness(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return {"d": np.array([-float((r - start).abs().sum()) for r in renders])}

    res = refine(start, h, FakeRenderer(), closeness, Metric({"d": 1.0}), RefineSettings(budget=9, batch=4))
    assert torch.equal(res.best_noise, start) and res.history.picks == () and res.best_index == 0
    assert res.best_score == res.start_score == 0.0 and len(res.scores) == 9


@pytest.mark.parametrize("budget,batch", [(1, 4), (2, 4), (8, 3), (16, 4), (33, 8)])
def test_budget_counts_every_render_and_batches_are_small(budget: int, batch: int) -> None:
    res, r = run(budget=budget, batch=batch)
    assert sum(r.calls) == budget == res.renders == len(res.curve)
    assert r.calls[0] == 1 and max(r.calls) <= batch
    assert len(res.strengths) == len(r.calls) - 1


def test_history_replays_bit_for_bit_and_reruns_are_identical() -> None:
    res, _ = run(seed=2**64 - 2, budget=25)
    assert res.moves >= 1
    again, _ = run(seed=2**64 - 2, budget=25)
    assert again.history.to_json() == res.history.to_json() and torch.equal(again.best_noise, res.best_noise)
    parsed = History.parse(res.history.to_json(), 2**64 - 2)  # what the saved workflow holds
    assert torch.equal(replay_noise(parsed, SHAPE), res.best_noise)  # the Variation Explorer's replay
    assert torch.equal(replay(start_of(2**64 - 2)[0], parsed.picks), res.best_noise)


def test_search_seed_gives_another_walk() -> None:
    a, _ = run(search_seed=0)
    b, _ = run(search_seed=1)
    assert a.history.picks and b.history.picks and a.history.picks[0].seed != b.history.picks[0].seed


def test_walk_continues_an_explorer_history() -> None:
    h = History(7).with_pick(Pick(index=1, seed=123, strength=0.4))
    start = replay_noise(h, SHAPE)
    res = refine(start, h, FakeRenderer(), cosine_parts, Metric({"cos": 1.0}), RefineSettings(budget=13, batch=4))
    assert res.history.picks[:1] == h.picks
    assert torch.equal(replay_noise(res.history, SHAPE), res.best_noise)


def test_strength_decays_on_failure_and_restarts() -> None:
    start, h = start_of(5)

    def flat(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:  # nothing ever improves
        return {"f": np.zeros(len(renders))}

    s = RefineSettings(budget=1 + 4 * 8, batch=4, strength=0.8, min_strength=0.1)  # 8 planned rounds: cycles of 4
    assert s.cycle == 4
    res = refine(start, h, FakeRenderer(), flat, Metric({"f": 1.0}), s)
    st = res.strengths
    assert st[:4] == pytest.approx([0.8, 0.4, 0.2, 0.1]), "failed rounds shrink the step to min_strength"
    assert st[4:] == pytest.approx(st[:4]), "below min_strength the step size restarts"
    assert res.history.picks == ()  # ties never move
    calls = {"n": 0}

    def two_wins(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:  # rounds 0 and 1 improve, then nothing
        calls["n"] += 1
        v = np.full(len(renders), -1.0)
        v[0] = {1: 0.0, 2: 1.0, 3: 2.0}.get(calls["n"], -1.0)
        return {"f": v}

    res2 = refine(start, h, FakeRenderer(), two_wins, Metric({"f": 1.0}), s)
    assert res2.moves == 2 and res2.strengths[:4] == pytest.approx([0.8, 0.8, 0.8, 0.4]), \
        "a round with an improvement keeps its strength"


def test_interrupt_keeps_the_best_so_far() -> None:
    start, h = start_of(5)
    rounds = {"n": 0}

    def check_cancel() -> None:
        rounds["n"] += 1
        if rounds["n"] > 4:  # the start, then 3 rounds
            raise Cancelled("stop")

    r = FakeRenderer()
    res = refine(start, h, r, cosine_parts, Metric({"cos": 1.0}), RefineSettings(budget=64, batch=4),
                 check_cancel=check_cancel)
    assert res.stopped and res.renders == 1 + 3 * 4 == sum(r.calls)
    assert res.best_score == max(res.scores) >= res.start_score
    assert torch.equal(replay_noise(res.history, SHAPE), res.best_noise)
    assert "stopped by Interrupt" in res.report(64)


def test_interrupt_inside_a_render_keeps_the_best() -> None:
    start, h = start_of(5)
    r = FakeRenderer()

    def render(noises: torch.Tensor) -> list[torch.Tensor]:
        if len(r.calls) == 3:
            raise Cancelled("interrupted mid-render")
        return r(noises)

    res = refine(start, h, render, cosine_parts, Metric({"cos": 1.0}), RefineSettings(budget=64, batch=4))
    assert res.stopped and res.renders == 9
    assert torch.equal(replay_noise(res.history, SHAPE), res.best_noise)


def test_interrupt_before_the_start_was_scored_propagates() -> None:
    start, h = start_of(5)

    def stop() -> None:
        raise Cancelled("at once")

    with pytest.raises(Cancelled):
        refine(start, h, FakeRenderer(), cosine_parts, Metric({"cos": 1.0}), RefineSettings(), check_cancel=stop)


def test_several_parts_are_calibrated_once_and_frozen() -> None:
    start, h = start_of(5)

    def two(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:
        c = cosine_parts(renders)["cos"]
        return {"cos": c, "mean": np.array([float(x.mean()) for x in renders])}

    m = Metric({"cos": 1.0, "mean": 0.5})
    res = refine(start, h, FakeRenderer(), two, m, RefineSettings(budget=21, batch=4))
    assert set(m.scale) == {"cos", "mean"}
    frozen = dict(m.scale)
    parts = {k: np.asarray(v) for k, v in res.parts.items()}
    expect = (parts["cos"] - m.center["cos"]) / frozen["cos"] + 0.5 * (parts["mean"] - m.center["mean"]) / frozen["mean"]
    np.testing.assert_allclose(res.scores, expect, rtol=1e-12)
    assert all(b >= a for a, b in zip(res.curve, res.curve[1:]))


def test_a_negative_single_weight_minimises() -> None:
    res_max, _ = run()
    start, h = start_of(5)
    res_min = refine(start, h, FakeRenderer(), cosine_parts, Metric({"cos": -1.0}), RefineSettings(budget=17))
    assert cosine_parts([res_min.best_noise])["cos"][0] < cosine_parts([start])["cos"][0] < res_max.best_score


@pytest.mark.parametrize("kw,needle", [
    ({"budget": 0}, "budget"), ({"budget": -3}, "budget"), ({"budget": True}, "budget"), ({"batch": 0}, "batch"),
    ({"strength": math.nan}, "NaN"), ({"strength": 0.0}, "strength"), ({"strength": 1.5}, "strength"),
    ({"min_strength": math.inf}, "min_strength"), ({"strength": 0.2, "min_strength": 0.3}, "min_strength"),
])
def test_bad_settings_are_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(RefineError, match=needle):
        RefineSettings(**kw)  # type: ignore[arg-type]


def test_bad_metrics_are_refused() -> None:
    with pytest.raises(RefineError, match="NaN"):
        Metric({"a": math.nan})
    with pytest.raises(RefineError, match="empty"):
        Metric({})
    with pytest.raises(RefineError, match="weight 0"):
        Metric({"a": 0.0})
    start, h = start_of(5)
    with pytest.raises(RefineError, match="NaN or infinite scores"):
        refine(start, h, FakeRenderer(), lambda r: {"a": np.full(len(r), np.nan)}, Metric({"a": 1.0}), RefineSettings())
    with pytest.raises(RefineError, match="start noise"):
        refine(start * math.inf, h, FakeRenderer(), cosine_parts, Metric({"cos": 1.0}), RefineSettings())
    with pytest.raises(RefineError, match="latent item"):
        refine(start[None], h, FakeRenderer(), cosine_parts, Metric({"cos": 1.0}), RefineSettings())


# --------------------------------------------------------------------------------------------- metrics on renders


def flat_image(rgb: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def test_query_terms_score_renders_like_library_rows() -> None:
    images = [flat_image((20, 20, 20)), flat_image((128, 128, 128)), flat_image((255, 136, 0))]
    q = Query(stats=(StatTarget("brightness", target=0.5),), colors=(("#FF8800", 1.0),))
    terms = {t.name: t.score(None) for t in query_terms(q, images)}
    assert set(terms) == {"brightness=0.5", "color #FF8800"}
    assert int(np.argmax(terms["brightness=0.5"])) == 1
    assert int(np.argmax(terms["color #FF8800"])) == 2 and terms["color #FF8800"][2] > 0.9


def test_build_metric_from_a_query() -> None:
    half = Image.fromarray(np.concatenate([np.full((16, 32, 3), 250, np.uint8), np.zeros((16, 32, 3), np.uint8)]))
    images = [half, flat_image((250, 250, 250)), flat_image((0, 0, 0))]
    q = Query(regions=(RegionTarget("top", lightness=1.0), RegionTarget("bottom", lightness=0.0)))
    score_parts, metric = build_metric(MetricSpec(query=q))
    parts = score_parts(images)
    assert len(metric.weights) == 2 and set(parts) == set(metric.weights)
    metric.calibrate(parts)
    assert int(np.argmax(metric.combine(parts))) == 0  # bright top, dark bottom


def test_build_metric_refuses_what_it_cannot_score() -> None:
    with pytest.raises(RefineError, match="empty text"):
        build_metric(MetricSpec(clip_weight=1.0, text="  "))
    with pytest.raises(RefineError, match="CLIP model"):
        build_metric(MetricSpec(clip_weight=1.0, text="a cat"))
    with pytest.raises(RefineError, match="no colour"):
        build_metric(MetricSpec(query=Query(text="a cat")))
    with pytest.raises(RefineError, match="empty"):
        build_metric(MetricSpec())
    with pytest.raises(NoiseQueryError):
        build_metric(MetricSpec(query=Query(colors=(("#GG0000", 1.0),))))


class FakeEmbedder:
    """CLIP-shaped: an image's embedding is its mean colour, a text's is a colour named in it."""

    def preprocess(self, im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, np.float32).mean(axis=(0, 1)) / 255.0)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return pixels.numpy().astype(np.float32) + 0.01

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0, 0.0] if "red" in t else [0.0, 0.0, 1.0] for t in texts], np.float32)


def test_clip_and_aesthetic_parts() -> None:
    images = [flat_image((250, 10, 10)), flat_image((10, 10, 250))]
    score_parts, metric = build_metric(MetricSpec(text="a red car", clip_weight=1.0, embedder=FakeEmbedder(),
                                                  aesthetic=lambda e: e[:, 2] * 10, aesthetic_weight=0.5))
    parts = score_parts(images)
    assert parts["clip"][0] > parts["clip"][1] and parts["aesthetic"][1] > parts["aesthetic"][0]
    assert metric.weights == {"clip": 1.0, "aesthetic": 0.5}


def test_curve_image() -> None:
    im = curve_image([0.1, 0.3, 0.2, 0.5], [0.1, 0.3, 0.3, 0.5], 200, 100)
    assert im.shape == (100, 200, 3) and im.dtype == np.uint8
    assert (im == np.array([255, 150, 40], np.uint8)).all(-1).any()  # the best-so-far line is drawn
    assert curve_image([1.0], [1.0]).shape == (256, 512, 3)


def test_a_mixed_metric_calibration_travels_with_the_history() -> None:
    from noisequery_core.exploration.explore import HistoryError
    from noisequery_core.exploration.refine import CALIBRATION_KEY, history_json, restore_calibration

    start, h = start_of(5)

    def two(renders: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return {"cos": cosine_parts(renders)["cos"], "mean": np.array([float(x.mean()) for x in renders])}

    m = Metric({"cos": 1.0, "mean": 0.5})
    res = refine(start, h, FakeRenderer(), two, m, RefineSettings(budget=13))
    text = history_json(res.history, m)
    assert History.parse(text, 5) == res.history  # still the explorer's format
    again = Metric({"cos": 1.0, "mean": 0.5})
    assert restore_calibration(text, again) and again.calibrated
    assert float(again.combine(two([res.best_noise]))[0]) == pytest.approx(res.best_score, abs=1e-12)
    assert not restore_calibration(text, Metric({"cos": 1.0, "other": 1.0}))  # other parts: nothing to restore
    assert history_json(res.history, Metric({"cos": 1.0})) == res.history.to_json()
    bad = json.loads(text)
    bad[CALIBRATION_KEY]["cos"] = [0.0, -1.0]
    with pytest.raises(HistoryError, match="scale"):
        restore_calibration(json.dumps(bad), Metric({"cos": 1.0, "mean": 0.5}))


@pytest.mark.parametrize("n", [1, 5, 8, 16, 30])
def test_the_search_is_anytime(n: int) -> None:
    """A budget-n walk renders the first n candidates of a longer walk and reaches the same best."""
    long, _ = run(budget=41)
    short, _ = run(budget=n)
    assert short.scores == long.scores[:n] and short.curve == long.curve[:n]
