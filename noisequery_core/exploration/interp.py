"""Moving between seeds and between prompts: slerp/lerp with extrapolation, seed strips and grids, conditioning blends.

Noise: two seeds' initial noises (exactly KSampler's batch-1 noise, noisequery_core.noise) are joined by a
spherical interpolation. Independent Gaussian noises are almost orthogonal and of almost equal norm, so every
point of the arc (and of its continuation past the ends: extrapolation) is again a plausible starting noise
with mean ~0 and std ~1; a straight line would shrink the norm in the middle (std ~0.71 at t=0.5) and give
washed-out images. The endpoints t=0 and t=1 are returned as the exact tensors, bit for bit.

Conditioning: token embeddings of two prompts are blended token by token, linearly or spherically, with
factors outside 0..1 allowed. Prompts of different token lengths (77 vs 154 for a long prompt) are first
brought to a common length by repeating each one's token rows up to the least common multiple, as ComfyUI
itself does before it batches conditionings (comfy/conds.py CONDCrossAttn.concat: repeating the keys of
cross-attention leaves its output unchanged). Pooled outputs (SDXL) are blended the same way.

Everything here takes and returns plain tensors: no ComfyUI import (the glue in nodes/ shapes CONDITIONING).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import NoiseQueryError
from ..noise import seed_noise

MODES = ("slerp", "lerp")
# Below this angle (radians) two vectors count as parallel and slerp falls back to a normalised lerp.
PARALLEL_EPS = 1e-6


class InterpolationError(NoiseQueryError):
    """Inputs that cannot be interpolated (shapes, modes, empty ranges)."""


def interpolation_ts(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> list[float]:
    """``steps`` evenly spaced factors from t_start to t_end, both included (one step: t_start only).

    The ends are the given floats exactly (not start + k*delta), so t_start=0, t_end=1 hit the endpoint
    tensors bit for bit.
    """
    if steps < 1:
        raise InterpolationError(f"steps must be at least 1 (got {steps}).")
    if steps == 1:
        return [float(t_start)]
    ts = [float(t_start) + (float(t_end) - float(t_start)) * i / (steps - 1) for i in range(steps)]
    ts[-1] = float(t_end)
    return ts


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dim: int | None = None) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1); any real t (outside 0..1 extrapolates).

    Directions move along the great circle through a and b; the norm moves geometrically from |a| to |b|
    (|a|^(1-t) |b|^t, positive for every t). With ``dim=None`` each tensor is one vector; with ``dim=-1``
    every row (e.g. every token embedding) is interpolated on its own. Computed in float64 and returned in
    a's dtype; t == 0 and t == 1 return copies of a and b exactly.

    Raises InterpolationError when the shapes differ.
    """
    if a.shape != b.shape:
        raise InterpolationError(f"cannot interpolate tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.to(a.dtype).clone()
    x, y = a.double(), b.double()
    if dim is None:
        xf, yf = x.reshape(1, -1), y.reshape(1, -1)
    else:
        xf, yf = x.movedim(dim, -1), y.movedim(dim, -1)
    na = xf.norm(dim=-1, keepdim=True)
    nb = yf.norm(dim=-1, keepdim=True)
    ua = xf / na.clamp_min(1e-300)
    ub = yf / nb.clamp_min(1e-300)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = sin.abs() < PARALLEL_EPS
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    direction = wa * ua + wb * ub
    # Parallel fallback: the lerp of two equal directions has norm 1 already; renormalise anyway (|t|>1).
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    zero = (na == 0) | (nb == 0)
    norm = torch.where(zero, (1.0 - t) * na + t * nb, na.clamp_min(1e-300) ** (1.0 - t) * nb.clamp_min(1e-300) ** t)
    out = direction * norm
    if dim is None:
        out = out.reshape(x.shape)
    else:
        out = out.movedim(-1, dim)
    return out.to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Straight-line interpolation a + t (b - a), any real t; exact at t=0 and t=1 (torch.lerp's two-sided form)."""
    if a.shape != b.shape:
        raise InterpolationError(f"cannot interpolate tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    return torch.lerp(a, b.to(a.dtype), float(t))


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float, mode: str = "slerp", dim: int | None = None) -> torch.Tensor:
    """``slerp`` or ``lerp`` by name (see those)."""
    if mode == "slerp":
        return slerp(a, b, t, dim=dim)
    if mode == "lerp":
        return lerp(a, b, t)
    raise InterpolationError(f"unknown interpolation mode {mode!r}; use one of {', '.join(MODES)}.")


# ------------------------------------------------------------------ seeds


def seed_strip_noise(seed_a: int, seed_b: int, ts: Sequence[float], shape: Sequence[int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(ts), *shape]: item i is the slerp of the two seeds' KSampler noises at ts[i].

    ``shape`` is one latent item (C, H, W). Items at t=0 / t=1 equal ``seed_noise(seed, (1, *shape))[0]``
    bit for bit. Equal seeds give that seed's noise on every item.
    """
    a = seed_noise(seed_a, (1, *shape), dtype)[0]
    b = seed_noise(seed_b, (1, *shape), dtype)[0]
    return torch.stack([slerp(a, b, t) for t in ts])


def grid_coordinates(rows: int, cols: int) -> list[tuple[float, float]]:
    """(u, v) of each grid cell in row-major order: u runs left->right over 0..1, v top->bottom over 0..1."""
    us = interpolation_ts(cols) if cols > 1 else [0.0]
    vs = interpolation_ts(rows) if rows > 1 else [0.0]
    return [(u, v) for v in vs for u in us]


def seed_grid_noise(corners: Sequence[int], rows: int, cols: int, shape: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows*cols, *shape], row-major: a 2-D slerp over four corner seeds.

    corners = (top-left, top-right, bottom-left, bottom-right). Cell (u, v) is
    slerp(slerp(tl, tr, u), slerp(bl, br, u), v), so every edge is the seed strip between its two corners and
    the four corner cells are the corner seeds' KSampler noises exactly.
    """
    if len(corners) != 4:
        raise InterpolationError(f"a seed grid needs 4 corner seeds, got {len(corners)}.")
    if rows < 1 or cols < 1:
        raise InterpolationError(f"a seed grid needs at least 1 row and 1 column (got {rows} x {cols}).")
    tl, tr, bl, br = (seed_noise(s, (1, *shape), dtype)[0] for s in corners)
    out = []
    for u, v in grid_coordinates(rows, cols):
        top, bottom = slerp(tl, tr, u), slerp(bl, br, u)
        out.append(slerp(top, bottom, v))
    return torch.stack(out)


# ------------------------------------------------------------------ conditioning


def match_token_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two [B, T, D] token tensors to a common T by repeating their rows up to lcm(Ta, Tb).

    This is what ComfyUI does before batching conditionings of different lengths (comfy/conds.py
    CONDCrossAttn.concat, "padding with repeat doesn't change result"): cross-attention over keys repeated
    k times gives the same output, so neither prompt's meaning changes.
    """
    if a.ndim != 3 or b.ndim != 3:
        raise InterpolationError(f"token tensors must be [batch, tokens, dim]; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[2] != b.shape[2]:
        raise InterpolationError(
            f"the two conditionings come from different text encoders (embedding width {a.shape[2]} vs {b.shape[2]}); "
            "encode both prompts with the same CLIP.")
    ta, tb = a.shape[1], b.shape[1]
    if ta == tb:
        return a, b
    n = math.lcm(ta, tb)
    return a.repeat(1, n // ta, 1), b.repeat(1, n // tb, 1)


def _match_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise InterpolationError(f"conditioning batches of {a.shape[0]} and {b.shape[0]} cannot be paired; use batch 1 on one side.")


def interpolate_tokens(a: torch.Tensor, b: torch.Tensor, ts: Sequence[float], mode: str = "slerp") -> torch.Tensor:
    """[len(ts) * B, T, D]: the token tensors blended at each factor (slerp per token row), stacked along the batch.

    Token lengths are matched first (match_token_length). A single factor of exactly 0 or 1 with equal lengths
    returns that side's tensor unchanged.
    """
    if len(ts) == 1 and a.shape == b.shape and float(ts[0]) in (0.0, 1.0):
        return (a if float(ts[0]) == 0.0 else b.to(a.dtype)).clone()
    a2, b2 = match_token_length(a, b)
    a2, b2 = _match_batch(a2, b2)
    return torch.cat([interpolate(a2, b2, t, mode, dim=-1) for t in ts])


def interpolate_pooled(a: torch.Tensor, b: torch.Tensor, ts: Sequence[float], mode: str = "slerp") -> torch.Tensor:
    """[len(ts) * B, D]: pooled outputs ([B, D]) blended at each factor, stacked along the batch."""
    if a.shape[-1] != b.shape[-1]:
        raise InterpolationError(f"pooled outputs of width {a.shape[-1]} and {b.shape[-1]} cannot be blended.")
    a2, b2 = _match_batch(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    return torch.cat([interpolate(a2, b2, t, mode, dim=-1) for t in ts])
