"""Strokes -> guidance maps, phrase tokens, schedule, attention bias and refocus loss (no ComfyUI)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from noisequery_core.errors import HighlightError
from noisequery_core.guidance.attention import attention_bias, phrase_attention_mass
from noisequery_core.guidance.preview import PREVIEW_MAX_SIDE, preview_shape
from noisequery_core.guidance.refocus import refocus_loss
from noisequery_core.guidance.regions import (
    MAP_TOLERANCE,
    MAX_MAP_SIDE,
    highlight_map,
    level_shape,
    map_centroid_and_area,
    principal_axis_degrees,
    stroke_map,
    strokes_map,
)
from noisequery_core.guidance.schedule import guidance_weight
from noisequery_core.guidance.strokes import (
    EMPTY_HIGHLIGHTS,
    MAX_PHRASES,
    MAX_POINTS,
    MAX_STROKES,
    MAX_TOTAL_POINTS,
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


# ------------------------------------------------------------------ limits and the cost of region maps


def _zigzag(n: int, phrase: str, cx: float = 0.5, cy: float = 0.5, size: float = 0.4, width: float = 0.05) -> dict:
    """A dense back-and-forth stroke: many segments close together, the costly shape for region maps."""
    return {"phrase": phrase, "width": width,
            "points": [[cx + size * (i / n - 0.5), cy + size / 2 * (-1) ** i] for i in range(n)]}


def _strokes_json(strokes: list[dict]) -> str:
    return json.dumps({"version": 1, "strokes": strokes})


@pytest.mark.parametrize(("strokes", "words"), [
    ([_zigzag(MAX_POINTS + 1, "a")], f"at most {MAX_POINTS} per stroke ({MAX_TOTAL_POINTS} in all)"),
    ([_zigzag(MAX_POINTS, "a"), _zigzag(MAX_POINTS, "b"), _zigzag(2, "c")],
     f"stroke 3 brings the strokes to {2 * MAX_POINTS + 2} points, more than the {MAX_TOTAL_POINTS} allowed"),
    ([_zigzag(2, f"p{i}") for i in range(MAX_PHRASES + 1)], f"{MAX_PHRASES + 1} different phrases, at most {MAX_PHRASES}"),
    ([_zigzag(2, "a")] * (MAX_STROKES + 1), f"at most {MAX_STROKES} are allowed"),
])
def test_stroke_limits_are_refused_naming_them(strokes: list[dict], words: str) -> None:
    with pytest.raises(HighlightError) as err:
        parse_strokes(_strokes_json(strokes))
    assert words in str(err.value), str(err.value)
    # the largest accepted drawing parses
    assert len(parse_strokes(_strokes_json([_zigzag(MAX_POINTS, "a"), _zigzag(MAX_POINTS, "b")]))) == 2


def _brute_force_map(strokes: list[Stroke], h: int, w: int, aspect: float, softness: float) -> torch.Tensor:
    """The definition of a region map, cell by cell and segment by segment (slow; small grids only)."""
    sx, sy = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
    cell = max(sx / w, sy / h)
    out = torch.zeros(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            p = torch.tensor([(j + 0.5) / w * sx, (i + 0.5) / h * sy], dtype=torch.float64)
            for s in strokes:
                pts = torch.tensor(s.points, dtype=torch.float64) * torch.tensor([sx, sy], dtype=torch.float64)
                a, ab = pts[:-1], pts[1:] - pts[:-1]
                t = (((p - a) * ab).sum(1) / (ab * ab).sum(1).clamp_min(1e-18)).clamp(0, 1)
                d = float((p - a - t[:, None] * ab).norm(dim=1).min())
                r = max(s.width / 2, 0.5 * cell)
                sigma = max(softness * r, 0.35 * cell)
                out[i, j] = max(float(out[i, j]), 1.0 if d <= r else math.exp(-0.5 * ((d - r) / sigma) ** 2))
    return out.float()


@pytest.mark.parametrize("seed", range(6))
def test_region_maps_match_their_definition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = (int(v) for v in torch.randint(3, 40, (2,), generator=g))
    aspect = float(torch.rand((), generator=g)) * 2.5 + 0.4
    softness = [0.0, 0.5, 3.0][seed % 3]
    strokes = [Stroke("a", float(torch.rand((), generator=g)) * 0.3 + 0.002,
                      tuple((float(x), float(y)) for x, y in torch.rand(int(torch.randint(2, 25, (), generator=g)), 2,
                                                                         generator=g) * 1.3 - 0.15))
               for _ in range(3)]
    got = strokes_map(strokes, h, w, aspect, softness)
    want = _brute_force_map(strokes, h, w, aspect, softness)
    assert got.shape == (h, w) and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= MAP_TOLERANCE, float((got - want).abs().max())
    assert bool(((want == 1) == (got == 1)).all())  # inside a stroke is exactly 1


def test_dense_points_on_a_coarse_grid_give_the_simple_strokes_map() -> None:
    dense = Stroke("a", 0.05, tuple((0.1 + 0.8 * i / (MAX_POINTS - 1), 0.5) for i in range(MAX_POINTS)))
    simple = Stroke("a", 0.05, ((0.1, 0.5), (0.9, 0.5)))
    for n in (8, 32):
        assert float((stroke_map(dense, n, n) - stroke_map(simple, n, n)).abs().max()) <= MAP_TOLERANCE


def test_huge_grids_are_resized_from_a_bounded_one() -> None:
    """A preview of a 16384 px image asks for 4096 x 4096 cells: computed at MAX_MAP_SIDE and resized."""
    s = Stroke("a", 0.1, ((0.2, 0.3), (0.8, 0.6)))
    t = time.process_time()
    big = stroke_map(s, 4096, 2048, 0.5)
    assert time.process_time() - t < 10.0 and big.shape == (4096, 2048)
    small = stroke_map(s, MAX_MAP_SIDE, MAX_MAP_SIDE // 2, 0.5)
    pooled = torch.nn.functional.adaptive_avg_pool2d(big[None, None], small.shape)[0, 0]
    assert float((pooled - small).abs().mean()) < 0.01
    assert preview_shape(16384, 8192) == (PREVIEW_MAX_SIDE // 2, PREVIEW_MAX_SIDE)
    assert preview_shape(512, 512) == (128, 128)


# The costliest accepted drawing found: the point budget spread over 32 phrases as dense zigzags with very soft
# edges (two 2048-point zigzags cost about half as much). The test computes every map one guide run needs for a
# 1024 x 1024 SD1.5 image (attention levels 128/64/32, GLIGEN boxes, the 64 x 64 report map, the preview): about
# 3.5 s of CPU on the 2-core CI machine. The former all-pairs maps took 88 s and 13 GB for one 4096-point stroke.
WORST_DRAWINGS = {
    "32 phrases": [_zigzag(MAX_TOTAL_POINTS // 32, f"p{i}", 0.1 + 0.13 * (i % 8), 0.15 + 0.23 * (i // 8), 0.1)
                   for i in range(32)],
}


@pytest.mark.parametrize("name", list(WORST_DRAWINGS))
def test_worst_accepted_drawing_maps_in_seconds(name: str) -> None:
    groups = group_highlights(parse_strokes(_strokes_json(WORST_DRAWINGS[name])))
    sizes = [(128, 128), (64, 64), (32, 32), (128, 128), (64, 64), preview_shape(1024, 1024)]
    t = time.process_time()
    for h, w in sizes:
        for hl in groups:
            m = highlight_map(hl, h, w, 1.0, 3.0)
            assert m.shape == (h, w) and bool(torch.isfinite(m).all())
    took = time.process_time() - t
    assert took < 15.0, f"{name}: {took:.1f} s of CPU"


def test_deeply_nested_highlights_json_is_refused_with_a_sentence() -> None:
    from noisequery_core.guidance.strokes import parse_strokes

    with pytest.raises(HighlightError, match="nested too deeply"):
        parse_strokes("[" * 200_000)
