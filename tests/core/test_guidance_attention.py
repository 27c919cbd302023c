"""Guided cross-attention on synthetic tensors: bias tiling, positive rows, mask merging, per-phrase attention,
refocus loss over layers and the refocus step, the guide's schedule settings (no ComfyUI)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from noisequery_core.errors import HighlightError
from noisequery_core.guidance.attention import (
    attention_bias,
    combine_masks,
    cond_rows,
    merge_heads,
    phrase_attention,
    phrase_attention_mass,
    split_heads,
    tile_keys,
)
from noisequery_core.guidance.refocus import PhraseAttention, refocus_loss, refocus_loss_over_layers, refocus_step
from noisequery_core.guidance.schedule import GuideSettings


def qkv(b: int = 2, heads: int = 2, nq: int = 16, nk: int = 7, dh: int = 8, seed: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, nq, dh, generator=g), torch.randn(b, heads, nk, dh, generator=g),
            torch.randn(b, heads, nk, dh, generator=g))


# ------------------------------------------------------------------ attention with per-phrase maps


@pytest.mark.parametrize("mask_shape", [None, (16, 7), (2, 16, 7), (2, 1, 16, 7), (2, 2, 16, 7)])
def test_phrase_attention_equals_torch_attention(mask_shape: tuple[int, ...] | None) -> None:
    q, k, v = qkv()
    mask = None if mask_shape is None else torch.randn(mask_shape)
    out, probs = phrase_attention(q, k, v, mask, [[1, 2], [5]])
    ref_mask = None if mask is None else (mask[:, None] if mask.ndim == 3 else mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    assert torch.allclose(out, want, atol=1e-5)
    assert len(probs) == 2 and all(p.shape == (2, 16) for p in probs)


def test_phrase_attention_maps_are_shares_of_the_keys() -> None:
    q, k, v = qkv()
    _, probs = phrase_attention(q, k, v, None, [list(range(7)), [0, 1, 2], [3, 4, 5, 6], [2, 99]])
    every, first, rest, clipped = probs
    assert torch.allclose(every, torch.ones_like(every), atol=1e-6), "all keys hold all the attention"
    assert torch.allclose(first + rest, every, atol=1e-6), "disjoint phrases add up"
    # positions past the keys are ignored, not an error
    _, (only2,) = phrase_attention(q, k, v, None, [[2]])
    assert torch.equal(clipped, only2)
    # a phrase masked out entirely gets no attention
    mask = torch.zeros(16, 7)
    mask[:, [3, 4]] = float("-inf")
    _, (gone,) = phrase_attention(q, k, v, mask, [[3, 4]])
    assert float(gone.abs().max()) == 0.0


def test_heads_split_and_merge_like_the_host_layout() -> None:
    t = torch.randn(2, 5, 3 * 4)  # [B, N, heads * dh], heads = 3
    h = split_heads(t, 3)
    assert h.shape == (2, 3, 5, 4)
    assert torch.equal(h[:, 1], t[..., 4:8]), "head i is the i-th dh-wide slice of the features"
    assert torch.equal(merge_heads(h), t)


# ------------------------------------------------------------------ bias over a batch


def test_tiled_bias_over_repeated_keys_is_the_same_attention() -> None:
    """ComfyUI repeats a prompt's tokens to batch conditionings of different lengths; the tiled bias keeps the
    guided attention exactly what it is over the prompt alone."""
    q, k, v = qkv(nk=7)
    region = torch.zeros(1, 16)
    region[0, :5] = 1
    bias = attention_bias(region, [[2, 3]], 7, 1.0)
    alone, _ = phrase_attention(q, k, v, bias, [[2, 3]])
    tiled, _ = phrase_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1), tile_keys(bias, 21), [[2, 3]])
    assert torch.allclose(alone, tiled, atol=1e-5)
    with pytest.raises(HighlightError, match="not a multiple"):
        tile_keys(bias, 20)


def test_cond_rows_follow_the_batch_chunks() -> None:
    assert cond_rows(4, [1, 0]).tolist() == [False, False, True, True]
    assert cond_rows(4, [0, 1]).tolist() == [True, True, False, False]
    assert cond_rows(3, []).tolist() == [True, True, True]
    assert cond_rows(2, [1]).tolist() == [False, False]


def test_combine_masks_biases_positive_rows_and_keeps_the_callers_mask() -> None:
    bias = torch.randn(16, 7)
    rows = torch.tensor([False, True])
    full = combine_masks(bias, rows, None)
    assert full is not None and full.shape == (2, 16, 7)
    assert torch.equal(full[0], torch.zeros(16, 7)) and torch.equal(full[1], bias)
    # no bias: the caller's mask passes untouched (also None)
    keep = torch.randn(2, 16, 7)
    assert combine_masks(None, rows, keep) is keep and combine_masks(None, rows, None) is None
    # boolean mask (True = attend) becomes -inf where attention is forbidden, added to the bias
    allowed = torch.ones(2, 16, 7, dtype=torch.bool)
    allowed[:, :, 6] = False
    got = combine_masks(bias, rows, allowed)
    assert got is not None and torch.all(torch.isinf(got[..., 6])) and torch.equal(got[1, :, :6], bias[:, :6])
    # a per-head mask broadcasts the bias over heads
    per_head = torch.randn(2, 3, 16, 7)
    got4 = combine_masks(bias, rows, per_head)
    assert got4 is not None and got4.shape == (2, 3, 16, 7)
    assert torch.allclose(got4[1, 2], bias + per_head[1, 2]) and torch.equal(got4[0], per_head[0])


def test_guided_rows_move_the_phrase_into_its_region_and_others_do_not() -> None:
    q, k, v = qkv(b=2, nq=64, nk=77, seed=3)
    region = torch.zeros(1, 64)
    region[0, :12] = 1
    cols = [[4, 5]]
    full = combine_masks(attention_bias(region, cols, 77, 1.0), cond_rows(2, [1, 0]), None)
    _, (guided,) = phrase_attention(q, k, v, full, cols)
    _, (plain,) = phrase_attention(q, k, v, None, cols)
    inside = phrase_attention_mass(guided, region[0])
    assert torch.allclose(guided[0], plain[0]), "the negative-prompt row is untouched"
    assert float(inside[1]) > 0.8 > float(phrase_attention_mass(plain, region[0])[1])


# ------------------------------------------------------------------ refocusing


def test_refocus_loss_over_layers_counts_positive_rows_only() -> None:
    region = torch.zeros(2, 16)
    region[0, :4] = 1
    region[1, 8:] = 1
    good = torch.zeros(16)
    good[:4] = 0.25
    bad = torch.full((16,), 1 / 16)
    probs = [torch.stack([bad, good]), torch.stack([bad, bad])]  # row 0 = uncond, row 1 = cond
    rec = PhraseAttention((4, 4), torch.tensor([False, True]), probs)
    got = refocus_loss_over_layers([rec, rec], lambda h, w: region)
    want = (refocus_loss(good[None], region[0]) + refocus_loss(bad[None], region[1])) / 2
    assert torch.allclose(got, want)
    assert float(refocus_loss(good[None], region[0])) == pytest.approx(0.0, abs=1e-6)
    # a layer without positive rows counts all of them
    all_uncond = PhraseAttention((4, 4), torch.tensor([False, False]), probs)
    mixed = (refocus_loss(torch.stack([bad, good]), region[0]) + refocus_loss(torch.stack([bad, bad]), region[1])) / 2
    assert torch.allclose(refocus_loss_over_layers([all_uncond], lambda h, w: region), mixed)
    with pytest.raises(HighlightError, match="no cross-attention"):
        refocus_loss_over_layers([], lambda h, w: region)


def test_refocus_step_size_and_direction() -> None:
    x = torch.randn(1, 4, 8, 8)
    grad = torch.randn(1, 4, 8, 8) * 37.0
    moved = refocus_step(x, grad, 0.05, 2.0)
    step = moved - x
    assert float(step.pow(2).mean().sqrt()) == pytest.approx(0.05 * 2.0, rel=1e-5), "RMS step = size x sigma"
    assert float((step * grad).sum()) < 0, "against the gradient"
    assert torch.equal(refocus_step(x, torch.zeros_like(x), 0.05, 2.0), x)


def test_refocus_steps_pull_the_phrase_into_its_region() -> None:
    """The loop the guide runs per refocused step, on synthetic queries: loss through phrase_attention, step."""
    q, k, v = qkv(b=1, heads=2, nq=64, nk=16, seed=7)
    region = torch.zeros(1, 64)
    region[0, 40:56] = 1
    rows = torch.tensor([True])
    x = q.clone().requires_grad_(True)
    losses = []
    for _ in range(30):
        _, probs = phrase_attention(x, k, v, None, [[3]])
        loss = refocus_loss_over_layers([PhraseAttention((8, 8), rows, probs)], lambda h, w: region)
        losses.append(float(loss.detach()))
        (grad,) = torch.autograd.grad(loss, x)
        x = refocus_step(x, grad, 0.1, 1.0).detach().requires_grad_(True)
    assert losses[-1] < 0.6 * losses[0], losses


# ------------------------------------------------------------------ schedule settings


def test_guide_settings_weight_and_refocus_window() -> None:
    s = GuideSettings(strength=2.0, start_percent=0.2, end_percent=0.6, schedule="linear",
                      refocus_steps_percent=0.1, refocus_iterations=2)
    assert s.weight_at(0.2) == pytest.approx(2.0) and s.weight_at(0.4) == pytest.approx(1.0)
    assert s.weight_at(0.1) == 0.0 and s.weight_at(0.7) == 0.0
    assert s.refocuses and s.refocus_at(0.2) and s.refocus_at(0.29)
    assert not s.refocus_at(0.31) and not s.refocus_at(0.19)
    off = GuideSettings(refocus_steps_percent=0.5, refocus_iterations=0)
    assert not off.refocuses and not off.refocus_at(0.0)
    assert GuideSettings(schedule="cosine").weight_at(0.3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
