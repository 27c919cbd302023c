"""Seed and prompt interpolation (noisequery_core.exploration.interp): statistics, exact endpoints, extrapolation, lengths."""

from __future__ import annotations

import math

import pytest
import torch

from noisequery_core.exploration.interp import (
    InterpolationError,
    interpolate_pooled,
    interpolate_tokens,
    interpolation_ts,
    lerp,
    match_token_length,
    seed_grid_noise,
    seed_strip_noise,
    slerp,
)
from noisequery_core.noise import seed_noise

SHAPE = (4, 64, 64)  # a 512x512 SD1.5 latent item: 16384 values per noise


def test_ts_are_even_and_hit_the_ends() -> None:
    ts = interpolation_ts(5, 0.0, 1.0)
    assert ts == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert interpolation_ts(4, -0.5, 1.5)[0] == -0.5 and interpolation_ts(4, -0.5, 1.5)[-1] == 1.5
    assert interpolation_ts(1, 0.3, 0.9) == [0.3]
    with pytest.raises(InterpolationError):
        interpolation_ts(0)


def test_seed_strip_endpoints_are_ksampler_noise_bit_for_bit() -> None:
    ts = interpolation_ts(7, 0.0, 1.0)
    strip = seed_strip_noise(11, 22, ts, SHAPE)
    assert strip.shape == (7, *SHAPE) and strip.dtype == torch.float32
    # seed_noise is KSampler's batch-1 noise (tests/host checks that against comfy.sample.prepare_noise)
    assert torch.equal(strip[0], seed_noise(11, (1, *SHAPE))[0])
    assert torch.equal(strip[-1], seed_noise(22, (1, *SHAPE))[0])
    assert not torch.equal(strip[1], strip[0]) and not torch.equal(strip[1], strip[2])


@pytest.mark.parametrize("t_start, t_end", [(0.0, 1.0), (-0.5, 1.5)])
def test_slerp_keeps_noise_statistics_per_step(t_start: float, t_end: float) -> None:
    """Every step (extrapolated ones too) is a plausible starting noise: mean ~0, std ~1."""
    ts = interpolation_ts(11, t_start, t_end)
    strip = seed_strip_noise(1234, 98765, ts, SHAPE)
    n = strip[0].numel()
    for t, item in zip(ts, strip):
        mean, std = float(item.mean()), float(item.std())
        assert abs(mean) < 5 / math.sqrt(n), f"t={t}: mean {mean}"
        assert abs(std - 1.0) < 0.02, f"t={t}: std {std}"
    # a straight line would not: its midpoint has std ~ 1/sqrt(2)
    mid = lerp(seed_noise(1234, SHAPE), seed_noise(98765, SHAPE), 0.5)
    assert abs(float(mid.std()) - 1 / math.sqrt(2)) < 0.02


def test_slerp_geometry_norm_and_extrapolation() -> None:
    a, b = seed_noise(1, SHAPE).double(), seed_noise(2, SHAPE).double()
    na, nb = float(a.norm()), float(b.norm())
    for t in (-1.0, -0.25, 0.3, 0.5, 1.25, 2.0):
        x = slerp(a, b, t)
        want = na ** (1 - t) * nb ** t
        assert abs(float(x.norm()) - want) < 1e-9 * want, t
    # extrapolating past b moves away from a: the angle to a grows beyond the a-b angle
    cos = lambda u, v: float((u * v).sum() / (u.norm() * v.norm()))  # noqa: E731
    assert cos(slerp(a, b, 1.3), a) < cos(b, a)
    assert cos(slerp(a, b, -0.3), b) < cos(a, b)
    # midpoint is equally far from both ends
    m = slerp(a, b, 0.5)
    assert abs(cos(m, a) - cos(m, b)) < 1e-9
    # equal inputs: the same tensor for every t (no division by a zero angle)
    for t in (0.2, 3.0):
        assert torch.allclose(slerp(a, a, t), a, atol=1e-9)


def test_lerp_exact_ends_and_extrapolation() -> None:
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(lerp(a, b, 0.0), a) and torch.equal(lerp(a, b, 1.0), b)
    assert torch.allclose(lerp(a, b, 2.0), 2 * b - a, atol=1e-6)
    with pytest.raises(InterpolationError, match="shapes"):
        lerp(a, torch.randn(2, 5), 0.5)


def test_seed_grid_corners_edges_and_stats() -> None:
    corners = (5, 6, 7, 8)
    shape = (4, 16, 16)
    g = seed_grid_noise(corners, 3, 4, shape)
    assert g.shape == (12, *shape)
    at = lambda r, c: g[r * 4 + c]  # noqa: E731
    for (r, c), s in zip(((0, 0), (0, 3), (2, 0), (2, 3)), corners):
        assert torch.equal(at(r, c), seed_noise(s, (1, *shape))[0]), (r, c)
    # the top edge is the strip between the top corners
    strip = seed_strip_noise(5, 6, interpolation_ts(4), shape)
    for c in range(4):
        assert torch.equal(at(0, c), strip[c])
    for item in g:
        assert abs(float(item.std()) - 1.0) < 0.08
    with pytest.raises(InterpolationError, match="4 corner"):
        seed_grid_noise((1, 2, 3), 2, 2, shape)


def test_unequal_token_lengths_are_repeated_to_their_lcm() -> None:
    a = torch.randn(1, 77, 32)
    b = torch.randn(1, 154, 32)
    a2, b2 = match_token_length(a, b)
    assert a2.shape == b2.shape == (1, 154, 32)
    assert torch.equal(a2[:, 77:], a) and torch.equal(b2, b)
    out = interpolate_tokens(a, b, [0.0, 0.5, 1.0], "slerp")
    assert out.shape == (3, 154, 32)
    assert torch.equal(out[0:1], a2) and torch.equal(out[2:3], b2)
    # token by token: the mid point's token norms lie between the two sides' (geometric mean)
    na, nb = a2.norm(dim=-1), b2.norm(dim=-1)
    assert torch.allclose(out[1].norm(dim=-1), (na * nb).sqrt()[0], rtol=1e-5)
    # linear, extrapolated
    lin = interpolate_tokens(a, b, [1.5], "lerp")
    assert torch.allclose(lin, b2 + 0.5 * (b2 - a2), atol=1e-5)
    # a single factor at an end returns that side untouched when lengths agree
    c = torch.randn(1, 77, 32)
    assert torch.equal(interpolate_tokens(a, c, [0.0]), a) and torch.equal(interpolate_tokens(a, c, [1.0]), c)
    with pytest.raises(InterpolationError, match="different text encoders"):
        interpolate_tokens(a, torch.randn(1, 77, 16), [0.5])


def test_padded_prompts_attend_as_the_prompt_alone() -> None:
    """The padding match_token_length (and so interpolate_tokens) applies to the shorter prompt leaves every
    cross-attention over it unchanged: at t=0 a 77-token prompt blended with a 154-token one conditions the
    UNet exactly as the 77-token prompt alone. (Zero or end-token padding would move attention onto the pad.)"""
    q = torch.randn(1, 10, 32)
    short, long = torch.randn(1, 77, 32), torch.randn(1, 154, 32)
    att = lambda k: torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), -1) @ k  # noqa: E731
    padded, _ = match_token_length(short, long)
    assert padded.shape == (1, 154, 32)
    assert torch.allclose(att(padded), att(short), atol=1e-5)
    at_a = interpolate_tokens(short, long, [0.0], "slerp")
    assert at_a.shape == (1, 154, 32) and torch.allclose(att(at_a), att(short), atol=1e-5)


def test_pooled_outputs_interpolate() -> None:
    pa, pb = torch.randn(1, 1280), torch.randn(1, 1280)
    out = interpolate_pooled(pa, pb, [0.0, 0.5, 1.0, 1.25], "slerp")
    assert out.shape == (4, 1280)
    assert torch.equal(out[0], pa[0]) and torch.equal(out[2], pb[0])
    assert torch.allclose(interpolate_pooled(pa, pb, [0.25], "lerp"), 0.75 * pa + 0.25 * pb, atol=1e-6)
    with pytest.raises(InterpolationError):
        interpolate_pooled(pa, torch.randn(1, 768), [0.5])
