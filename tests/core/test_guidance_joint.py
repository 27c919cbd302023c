"""Guidance on joint attention (SD3 MMDiT / Flux layout) on synthetic tensors: token layout, the two-sided bias,
the phrase's attention mass inside its region, no leak of the phrase's value outside it, other tokens untouched,
phrases found across CLIP + T5 token segments (no ComfyUI)."""
from __future__ import annotations

import pytest
import torch

from noisequery_core.errors import HighlightError
from noisequery_core.guidance.attention import combine_masks, cond_rows, phrase_attention, phrase_attention_mass
from noisequery_core.guidance.joint import (
    joint_bias,
    joint_layout,
    joint_phrase_probs,
    patch_grid,
    phrase_key_positions,
)
from noisequery_core.guidance.strokes import Highlight
from noisequery_core.guidance.tokens import segment_token_columns

GRID = (6, 10)  # a 3:5 image-token grid: any aspect ratio
N_IMG = GRID[0] * GRID[1]
CTX = 12  # prompt tokens
COLS = [[3, 4]]  # the phrase's tokens


def box_region(y0: int, y1: int, x0: int, x1: int, grid: tuple[int, int] = GRID) -> torch.Tensor:
    m = torch.zeros(grid)
    m[y0:y1, x0:x1] = 1.0
    return m.reshape(1, -1)


REGION = box_region(1, 4, 1, 5)  # 12 of 60 tokens: 20 %


def qkv(n: int, b: int = 2, heads: int = 2, dh: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, dh, generator=g) for _ in range(3))


# ------------------------------------------------------------------ layout


def test_layout_text_then_image_and_what_is_not_joint() -> None:
    flux = joint_layout(CTX + N_IMG, CTX, GRID)
    assert flux is not None and flux.image_slice() == slice(CTX, CTX + N_IMG) and flux.text_start == 0
    # reference-image tokens after the image (Flux Kontext) stay outside the layout
    kontext = joint_layout(CTX + 2 * N_IMG, CTX, GRID)
    assert kontext is not None and kontext.image_slice() == slice(CTX, CTX + N_IMG)
    # MMDiT register tokens before the text
    reg = joint_layout(4 + CTX + N_IMG, CTX, GRID, text_offset=4)
    assert reg is not None and reg.text_start == 4 and reg.image_start == 4 + CTX
    # an image-only self-attention (SD3.5's extra x-block attention) is not a joint call
    assert joint_layout(N_IMG, CTX, GRID) is None
    assert joint_layout(CTX + N_IMG - 1, CTX, GRID) is None


@pytest.mark.parametrize("hw, patch, want", [((16, 16), 2, (8, 8)), ((15, 9), 2, (8, 5)), ((12, 20), 2, (6, 10)),
                                             ((7, 7), 1, (7, 7))])
def test_patch_grid_pads_like_the_models(hw: tuple[int, int], patch: int, want: tuple[int, int]) -> None:
    assert patch_grid(hw, patch) == want
    with pytest.raises(HighlightError):
        patch_grid(hw, 0)


def test_phrase_positions_follow_repeated_prompts() -> None:
    lay = joint_layout(3 * CTX + N_IMG, 3 * CTX, GRID)
    assert lay is not None
    assert phrase_key_positions([[3, 4], [99]], CTX, lay) == [[3, 4, 15, 16, 27, 28], []]
    bad = joint_layout(CTX + 5 + N_IMG, CTX + 5, GRID)
    assert bad is not None
    with pytest.raises(HighlightError, match="not a multiple"):
        phrase_key_positions(COLS, CTX, bad)


# ------------------------------------------------------------------ the bias


def test_bias_is_two_sided_on_the_phrase_and_zero_elsewhere() -> None:
    lay = joint_layout(CTX + N_IMG, CTX, GRID)
    assert lay is not None
    b = joint_bias(REGION, COLS, CTX, lay, 0.5, inside=3.0, outside=2.0)
    img = lay.image_slice()
    want = 0.5 * (3.0 * REGION[0] - 2.0 * (1 - REGION[0]))
    for c in (3, 4):
        assert torch.equal(b[img, c], want), "image query -> phrase key"
        assert torch.equal(b[c, img], want), "phrase query -> image key (text side)"
    rest = b.clone()
    rest[img, 3:5] = 0
    rest[3:5, img] = 0
    assert float(rest.abs().max()) == 0.0, "nothing else is biased (text-text, image-image, other tokens)"
    one_sided = joint_bias(REGION, COLS, CTX, lay, 0.5, text_side=False)
    assert float(one_sided[3:5, img].abs().max()) == 0.0
    assert float(joint_bias(REGION, COLS, CTX, lay, 0.0).abs().max()) == 0.0
    with pytest.raises(HighlightError, match="do not fit"):
        joint_bias(REGION[:, :-1], COLS, CTX, lay, 1.0)


# ------------------------------------------------------------------ what the bias does to attention


def _maps(weight: float, seed: int = 3, text_side: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    lay = joint_layout(CTX + N_IMG, CTX, GRID)
    assert lay is not None
    q, k, v = qkv(CTX + N_IMG, seed=seed)
    rows = cond_rows(2, [1, 0])  # row 0 negative prompt, row 1 positive
    full = combine_masks(joint_bias(REGION, COLS, CTX, lay, weight, text_side=text_side), rows, None)
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + (0 if full is None else full[:, None])).softmax(-1).mean(1)
    out, probs = phrase_attention(q, k, v, full, [[3, 4]])
    return p, joint_phrase_probs(probs, lay), out


def test_phrase_mass_moves_inside_its_region_on_the_positive_rows() -> None:
    _, (plain,), _ = _maps(0.0)
    _, (guided,), _ = _maps(1.0)
    area = float(REGION.mean())
    before, after = phrase_attention_mass(plain, REGION[0]), phrase_attention_mass(guided, REGION[0])
    assert abs(float(before[1]) - area) < 0.15, "unguided, the phrase spreads over the image"
    assert float(after[1]) >= 0.8 > float(before[1])
    assert torch.allclose(guided[0], plain[0]), "the negative-prompt row is untouched"


def test_text_side_keeps_the_phrase_reading_its_region() -> None:
    img = slice(CTX, CTX + N_IMG)
    p0, _, _ = _maps(0.0)
    p1, _, _ = _maps(1.0)
    p_one, _, _ = _maps(1.0, text_side=False)
    for c in (3, 4):
        reads = [float(phrase_attention_mass(p[1, c, img], REGION[0])) for p in (p0, p1, p_one)]
        assert reads[1] >= 0.8 > reads[0] and reads[2] == pytest.approx(reads[0], abs=1e-6), reads


def test_phrase_value_does_not_leak_outside_its_region() -> None:
    """Change the phrase tokens' values: the image outputs that change are those inside its region."""
    lay = joint_layout(CTX + N_IMG, CTX, GRID)
    assert lay is not None
    q, k, v = qkv(CTX + N_IMG, seed=5)
    v2 = v.clone()
    v2[:, :, 3:5] += 5.0
    img = lay.image_slice()
    shares = []
    for w in (0.0, 1.0):
        mask = joint_bias(REGION, COLS, CTX, lay, w)
        a, _ = phrase_attention(q, k, v, mask, COLS)
        b, _ = phrase_attention(q, k, v2, mask, COLS)
        change = (b - a)[:, :, img].norm(dim=-1).mean((0, 1))
        shares.append(float((change * REGION[0]).sum() / change.sum()))
    assert shares[1] >= 0.8 > shares[0], shares


def test_other_tokens_keep_their_maps() -> None:
    p0, _, _ = _maps(0.0)
    p1, _, _ = _maps(1.0)
    img = slice(CTX, CTX + N_IMG)
    for j in [t for t in range(CTX) if t not in (3, 4)]:
        x, y = p0[1, img, j], p1[1, img, j]
        x, y = x / x.sum(), y / y.sum()
        assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.95, j
        assert float((x - y).abs().sum() / 2) < 0.15, j


# ------------------------------------------------------------------ phrases across encoders


def test_phrases_are_found_in_every_segment_of_the_conditioning() -> None:
    vocab_clip = {"a": 1, "cat": 2, "red": 3, "ball": 4}
    vocab_t5 = {"a": 10, "cat": 11, "red": 12, "ball": 13}
    clip_rows = [[49406, 1, 2, 3, 4, 49407] + [49407] * 71]  # 77 positions
    t5_rows = [[10, 11, 12, 13, 1] + [0] * 72]
    segs = [(clip_rows, lambda s: [vocab_clip[w] for w in s.split()]),
            (t5_rows, lambda s: [vocab_t5[w] for w in s.split()])]
    cols, total = segment_token_columns([Highlight("a cat"), Highlight("red ball")], segs, "a cat red ball")
    assert total == 154
    assert cols == [[1, 2, 77, 78], [3, 4, 79, 80]]
    only_t5 = [(t5_rows, segs[1][1])]
    assert segment_token_columns([Highlight("red ball")], only_t5)[0] == [[2, 3]]
    with pytest.raises(HighlightError, match="'a dog' is not in the prompt"):
        segment_token_columns([Highlight("a dog")], [(clip_rows, lambda s: [9, 9])], "a cat")
