"""A guide's inputs and outputs on synthetic data: strokes + masks read once, phrase token columns with an injected
tokenizer, GLIGEN boxes, region stacks, the regions preview and the summary lines (no ComfyUI)."""
from __future__ import annotations

import json

import pytest
import torch

from noisequery_core.errors import HighlightError
from noisequery_core.guidance.preview import PALETTE, highlight_rgb, region_preview, summary_lines
from noisequery_core.guidance.regions import highlight_map, phrase_boxes, region_stack
from noisequery_core.guidance.strokes import EMPTY_HIGHLIGHTS, Highlight, Stroke, read_highlights
from noisequery_core.guidance.tokens import phrase_token_columns

# A word-level stand-in for a CLIP tokenizer: one id per word.
VOCAB = {"a": 320, "cat": 2368, "and": 537, "red": 736, "ball": 3807, "on": 525, "lawn": 11024}


def tokenize(phrase: str) -> list[int]:
    return [VOCAB[w] for w in phrase.lower().split()]


def strokes_json(*strokes: dict) -> str:
    return json.dumps({"version": 1, "strokes": list(strokes)})


CAT = {"phrase": "a cat", "width": 0.1, "points": [[0.25, 0.5], [0.75, 0.5]], "color": "#00ff00"}


# ------------------------------------------------------------------ reading highlights


def test_read_highlights_groups_strokes_and_masks_by_phrase() -> None:
    mask = torch.zeros(8, 8)
    mask[:4] = 1
    text = strokes_json(CAT, {**CAT, "points": [[0.1, 0.1], [0.2, 0.2]]}, {**CAT, "phrase": " a red ball "})
    got = read_highlights(text, [("a red ball", mask), ("a lawn", mask)])
    assert [h.phrase for h in got] == ["a cat", "a red ball", "a lawn"]
    assert [(len(h.strokes), len(h.masks)) for h in got] == [(2, 0), (1, 1), (0, 1)]


@pytest.mark.parametrize("text, masks, words", [
    ("", [], "no highlights"),
    (EMPTY_HIGHLIGHTS, [], "no highlights"),
    ("{oops", [], "not valid JSON"),
    (EMPTY_HIGHLIGHTS, [("a cat", torch.zeros(4, 4))], "is empty"),
])
def test_read_highlights_refuses_nothing_or_bad_input(text: str, masks: list, words: str) -> None:
    with pytest.raises(HighlightError) as err:
        read_highlights(text, masks)
    assert words in str(err.value), str(err.value)


# ------------------------------------------------------------------ phrase token columns


def test_phrase_token_columns_with_an_injected_tokenizer() -> None:
    rows = [[49406, 320, 2368, 537, 320, 736, 3807, 49407], [49406, 525, 320, 11024, 49407, 49407]]
    hls = [Highlight("a red ball"), Highlight("a lawn"), Highlight("cat")]
    cols, total = phrase_token_columns(hls, rows, tokenize, "a cat and a red ball, on a lawn")
    assert total == 14
    assert cols == [[4, 5, 6], [10, 11], [2]]
    with pytest.raises(HighlightError, match="'a dog' is not in the prompt 'a cat'"):
        phrase_token_columns([Highlight("a dog")], rows, lambda p: [999], "a cat")


# ------------------------------------------------------------------ boxes and stacks


def test_phrase_boxes_in_latent_cells() -> None:
    quarter = torch.zeros(64, 128)
    quarter[32:, 64:] = 1  # bottom-right quarter of a 2:1 image
    (box,) = phrase_boxes([Highlight("a", masks=[quarter])], 512, 256, 0.5)
    assert box == (16, 32, 16, 32), "(h, w, y, x) of the bottom-right quarter of a 32 x 64 latent"
    # a horizontal stroke across the middle half: box spans its length, a few cells high, centred
    (h, w, y, x), = phrase_boxes([Highlight("a", strokes=[Stroke("a", 0.1, ((0.25, 0.5), (0.75, 0.5)))])], 512, 512, 0.0)
    assert 32 <= w <= 40 and 12 <= x <= 16 and 4 <= h <= 8 and abs((y + h / 2) - 32) <= 1
    speck = torch.zeros(1024, 1024)
    speck[0, 0] = 1
    with pytest.raises(HighlightError, match="region of 'tiny' is empty at 64x64"):
        phrase_boxes([Highlight("tiny", masks=[speck])], 64, 64, 0.5)


def test_region_stack_is_the_flattened_maps_in_order() -> None:
    hls = [Highlight("a", strokes=[Stroke("a", 0.1, ((0.1, 0.1), (0.4, 0.3)))]),
           Highlight("b", masks=[torch.eye(16)])]
    got = region_stack(hls, 6, 10, 10 / 6, 0.5)
    assert got.shape == (2, 60)
    for i, hl in enumerate(hls):
        assert torch.equal(got[i], highlight_map(hl, 6, 10, 10 / 6, 0.5).reshape(-1))


# ------------------------------------------------------------------ preview and summary


def test_region_preview_paints_each_region_in_its_colour() -> None:
    hls = [Highlight("a cat", strokes=[Stroke("a cat", 0.2, ((0.1, 0.25), (0.9, 0.25)), "#00ff00")]),
           Highlight("a lawn", masks=[torch.cat([torch.zeros(16, 32), torch.ones(16, 32)])])]
    out = region_preview(hls, 256, 128, 0.0)
    assert out.shape == (1, 32, 64, 3) and out.dtype == torch.float32
    grey = 0.08
    on_stroke = out[0, 8, 32]  # y = 0.25 of the height, centre
    assert torch.allclose(on_stroke, torch.tensor([0.25 * grey, 0.25 * grey + 0.75, 0.25 * grey]), atol=1e-5)
    lawn = torch.tensor(PALETTE[1]) / 255.0  # no stroke colour: the palette's, by index
    assert torch.allclose(out[0, 28, 10], 0.25 * grey + 0.75 * lawn, atol=1e-5)
    # over a background, untouched pixels are the dimmed background
    bg = torch.zeros(2, 50, 100, 4)
    bg[..., 0] = 1.0  # red, with an alpha channel and a second item that must be ignored
    bg[1] = 0.5
    over = region_preview(hls[:1], 256, 128, 0.0, bg)
    assert torch.allclose(over[0, 28, 10], torch.tensor([0.6, 0.0, 0.0]), atol=1e-5)


def test_highlight_colour_from_the_first_valid_stroke_colour() -> None:
    s = ((0.1, 0.1), (0.2, 0.2))
    assert highlight_rgb(Highlight("a", strokes=[Stroke("a", 0.1, s, "#ff8000")]), 0) == pytest.approx((1.0, 128 / 255, 0.0))
    assert highlight_rgb(Highlight("a", strokes=[Stroke("a", 0.1, s), Stroke("a", 0.1, s, "#0000ff")]), 3) == (0, 0, 1)
    fallback = tuple(c / 255 for c in PALETTE[2])
    assert highlight_rgb(Highlight("a", strokes=[Stroke("a", 0.1, s, "not a colour")]), 2) == pytest.approx(fallback)
    assert highlight_rgb(Highlight("a", masks=[torch.ones(2, 2)]), 10) == pytest.approx(fallback)


def test_summary_lines_name_tokens_centre_and_area() -> None:
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    hls = [Highlight("a cat", masks=[left]), Highlight("a lawn", strokes=[Stroke("a lawn", 0.2, ((0.5, 0.5), (0.5, 0.6)))])]
    lines = summary_lines(hls, [[1, 2], list(range(10, 20))], 512, 512, 0.5)
    assert lines[0] == "'a cat' (1 mask): tokens [1, 2], centre (0.25, 0.50), 50% of the image"
    assert lines[1].startswith("'a lawn' (1 stroke): tokens [10, 11, 12, 13, 14, 15, 16, 17]..., centre (0.50, 0.55)")
