"""Strokes -> guidance maps, phrase tokens, schedule, attention bias and refocus loss (no ComfyUI)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from noisequery_core.errors import HighlightError
from noisequery_core.guidance.attention import attention_bias, phrase_attention_mass
from noisequery_core.guidance.refocus import refocus_loss
from noisequery_core.guidance.regions import (
    highlight_map,
    level_shape,
    map_centroid_and_area,
    principal_axis_degrees,
    stroke_map,
)
from noisequery_core.guidance.schedule import guidance_weight
from noisequery_core.guidance.strokes import (
    EMPTY_HIGHLIGHTS,
    Highlight,
    Stroke,
    check_masks,
    group_highlights,
    parse_strokes,
    strokes_to_json,
)
from noisequery_core.guidance.tokens import find_phrase_positions


def line(angle_deg: float, length: float = 0.5, cx: float = 0.5, cy: float = 0.5, aspect: float = 1.0,
         width: float = 0.06, phrase: str = "a cat") -> Stroke:
    """A straight stroke through (cx, cy) at angle_deg in image units (x right, y down)."""
    sx, sy = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    dx = math.cos(math.radians(angle_deg)) * length / 2
    dy = math.sin(math.radians(angle_deg)) * length / 2
    return Stroke(phrase, width, ((cx - dx / sx, cy - dy / sy), (cx + dx / sx, cy + dy / sy)))


# ------------------------------------------------------------------ JSON


def test_parse_round_trip_and_empty():
    s = [Stroke("a cat", 0.05, ((0.1, 0.2), (0.3, 0.4), (0.5, 0.45)), "#ff0000"), Stroke("a ball", 0.2, ((0.9, 0.9), (0.8, 0.7)))]
    assert parse_strokes(strokes_to_json(s)) == s
    assert parse_strokes("") == [] and parse_strokes(None) == [] and parse_strokes(EMPTY_HIGHLIGHTS) == []


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "'strokes' list"),
    ('{"version": 2, "strokes": []}', "version 2"),
    ('{"strokes": [{"width": 0.1, "points": [[0, 0], [1, 1]]}]}', "stroke 1 has no phrase"),
    ('{"strokes": [{"phrase": "a", "width": 0, "points": [[0, 0], [1, 1]]}]}', "outside (0, 1]"),
    ('{"strokes": [{"phrase": "a", "width": "big", "points": [[0, 0], [1, 1]]}]}', "finite number"),
    ('{"strokes": [{"phrase": "a", "width": 0.1, "points": [[0, 0]]}]}', "at least 2 points"),
    ('{"strokes": [{"phrase": "a", "width": 0.1, "points": [[0, 0], [1]]}]}', "point 2 must be [x, y]"),
    ('{"strokes": [{"phrase": "a", "width": 0.1, "points": [[0, 0], [5, 1]]}]}', "far outside"),
    ('{"strokes": [{"phrase": "a", "width": 0.1, "points": [[0, NaN], [1, 1]]}]}', "finite number"),
])
def test_bad_json_is_refused_with_a_clear_message(text, needle):
    with pytest.raises(HighlightError, match=None) as err:
        parse_strokes(text)
    assert needle in str(err.value), str(err.value)
    assert str(err.value).startswith("highlights")


def test_group_and_masks():
    s = [line(0), line(90, phrase="a ball"), line(45)]
    groups = group_highlights(s, [("a ball", torch.ones(4, 4)), ("a dog", torch.ones(4, 4))])
    assert [g.phrase for g in groups] == ["a cat", "a ball", "a dog"]
    assert len(groups[0].strokes) == 2 and len(groups[1].masks) == 1
    with pytest.raises(HighlightError, match="empty"):
        check_masks([("a cat", torch.zeros(8, 8))])
    with pytest.raises(HighlightError, match="shape"):
        check_masks([("a cat", torch.ones(2, 8, 8))])


# ------------------------------------------------------------------ maps


@pytest.mark.parametrize("angle", [0, 30, 75, 120, 160])
@pytest.mark.parametrize("h, w", [(64, 64), (40, 96), (96, 48)])
def test_orientation_is_preserved(angle, h, w):
    aspect = w / h
    m = stroke_map(line(angle, length=0.6, aspect=aspect, width=0.05), h, w, aspect)
    got = principal_axis_degrees(m, aspect)
    diff = abs((got - angle + 90) % 180 - 90)
    assert diff < 3.0, (angle, got)


def test_position_and_size_are_preserved():
    s = Stroke("a cat", 0.1, ((0.2, 0.7), (0.4, 0.8)))
    m = stroke_map(s, 128, 128)
    cx, cy, area = map_centroid_and_area(m)
    assert abs(cx - 0.3) < 0.01 and abs(cy - 0.75) < 0.01
    wide = stroke_map(Stroke("a cat", 0.3, s.points), 128, 128)
    assert map_centroid_and_area(wide)[2] > 2 * area
    # inside the stroke the map is 1, far away 0
    assert float(m[int(0.75 * 128), int(0.3 * 128)]) == 1.0 and float(m[10, 120]) < 1e-6


def test_resolution_independence():
    hl = Highlight("a cat", strokes=[Stroke("a cat", 0.08, ((0.1, 0.1), (0.5, 0.3), (0.8, 0.9)))])
    fine = highlight_map(hl, 128, 128)
    for n in (8, 16, 32, 64):
        coarse = highlight_map(hl, n, n)
        pooled = torch.nn.functional.adaptive_avg_pool2d(fine[None, None], n)[0, 0]
        c1, c2 = map_centroid_and_area(coarse), map_centroid_and_area(pooled)
        assert abs(c1[0] - c2[0]) < 0.03 and abs(c1[1] - c2[1]) < 0.03, n
        corr = torch.corrcoef(torch.stack([coarse.reshape(-1), pooled.reshape(-1)]))[0, 1]
        assert corr > 0.85, (n, float(corr))


def test_thin_stroke_still_marks_coarse_grids():
    m = stroke_map(Stroke("a cat", 0.005, ((0.1, 0.5), (0.9, 0.5))), 8, 8)
    assert float(m.max()) > 0.9 and float(m.sum()) >= 6


def test_mask_highlight_resizes():
    mask = torch.zeros(256, 128)
    mask[:128, :64] = 1  # top-left quarter
    m = highlight_map(Highlight("a", masks=[mask]), 16, 8)
    cx, cy, area = map_centroid_and_area(m)
    assert abs(area - 0.25) < 0.01 and cx < 0.3 and cy < 0.3
    assert highlight_map(Highlight("a", masks=[torch.ones(4, 4)]), 32, 32).min() == 1.0


def test_level_shape_follows_unet_downsampling():
    assert level_shape(64 * 96, (64, 96)) == (64, 96)
    assert level_shape(32 * 48, (64, 96)) == (32, 48)
    assert level_shape(4 * 7, (13, 25)) == (4, 7)  # (13, 25) -> (7, 13) -> (4, 7)
    assert level_shape(77, (64, 64)) is None


# ------------------------------------------------------------------ tokens, schedule, bias, loss


def test_find_phrase_positions_across_chunks():
    rows = [[49406, 320, 2368, 537, 320, 736, 49407], [49406, 320, 2368, 49407, 49407, 49407, 49407]]
    assert find_phrase_positions(rows, [320, 2368]) == [1, 2, 8, 9]
    assert find_phrase_positions(rows, [736]) == [5]
    assert find_phrase_positions(rows, [999]) == [] and find_phrase_positions(rows, []) == []


def test_guidance_weight():
    assert guidance_weight(0.0, 0.0, 0.5, "cosine") == 1.0
    assert guidance_weight(0.5, 0.0, 0.5, "cosine") == pytest.approx(0.0)
    assert guidance_weight(0.25, 0.0, 0.5, "linear") == pytest.approx(0.5)
    assert guidance_weight(0.25, 0.0, 0.5, "cosine") == pytest.approx(0.5)
    assert guidance_weight(0.3, 0.0, 0.5, "constant") == 1.0
    assert guidance_weight(0.7, 0.0, 0.5, "constant") == 0.0
    assert guidance_weight(0.1, 0.2, 0.5, "constant") == 0.0
    with pytest.raises(HighlightError):
        guidance_weight(0.1, 0, 1, "step")


def test_attention_bias_only_touches_phrase_columns():
    region = torch.zeros(2, 16)
    region[0, :4] = 1
    region[1, 8:] = 1
    b = attention_bias(region, [[1, 2], [5]], 10, 1.0, inside=2.0, outside=3.0)
    assert b.shape == (16, 10)
    assert torch.all(b[:, [0, 3, 4, 6, 7, 8, 9]] == 0)
    assert torch.all(b[:4, 1] == 2.0) and torch.all(b[4:, 1] == -3.0)
    assert torch.all(b[8:, 5] == 2.0) and torch.all(b[:8, 5] == -3.0)
    assert torch.all(attention_bias(region, [[1]], 10, 0.0) == 0)


def test_bias_moves_attention_mass_into_the_region():
    torch.manual_seed(0)
    n, keys = 64, 77
    logits = torch.randn(n, keys)
    region = torch.zeros(n)
    region[:12] = 1  # < 25 %
    cols = [3, 4]
    before = phrase_attention_mass(logits.softmax(-1)[:, cols].sum(-1), region)
    after = phrase_attention_mass((logits + attention_bias(region[None], [cols], keys, 1.0)).softmax(-1)[:, cols].sum(-1), region)
    assert before < 0.35 and after > 0.8


def test_refocus_loss_gradient_reduces_outside_mass():
    torch.manual_seed(0)
    n = 64
    region = torch.zeros(n)
    region[20:36] = 1
    logits = torch.randn(n, requires_grad=True)
    start = float(refocus_loss(logits.detach().softmax(-1)[None], region))
    x = logits
    for _ in range(50):
        loss = refocus_loss(x.softmax(-1)[None], region)
        (g,) = torch.autograd.grad(loss, x)
        x = (x - 5.0 * g).detach().requires_grad_(True)
    end = float(refocus_loss(x.softmax(-1)[None], region))
    assert end < 0.5 * start
    assert float(phrase_attention_mass(x.softmax(-1), region)) > 0.9


def test_strokes_json_is_what_the_widget_writes():
    # The widget (web/js/highlight_scribble.js) writes exactly this shape; keep the two in sync.
    text = json.dumps({"version": 1, "strokes": [{"phrase": "a cat", "width": 0.06, "points": [[0.1, 0.2], [0.3, 0.4]],
                                                   "color": "#e6194b"}]})
    (s,) = parse_strokes(text)
    assert s.phrase == "a cat" and s.color == "#e6194b" and s.points == ((0.1, 0.2), (0.3, 0.4))
