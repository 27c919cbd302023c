"""Attention refocusing: a loss on each phrase's cross-attention maps and the latent step against its gradient.

As in Attention Refocusing / BoxDiff: in the first sampling steps the latent moves so that each
phrase attends inside its region (little mass outside, the region evenly covered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..errors import HighlightError
from .attention import phrase_attention_mass


class PhraseAttention(NamedTuple):
    """What one cross-attention call saw: its grid, which rows are the positive prompt, per-phrase attention."""

    grid: tuple[int, int]  # (h, w) of the layer
    cond_rows: torch.Tensor  # [B] bool
    probs: list[torch.Tensor]  # per phrase [B, h*w] (phrase_attention's probs)


def refocus_loss(probs: torch.Tensor, region: torch.Tensor, coverage_weight: float = 0.5) -> torch.Tensor:
    """Attention-refocusing loss for one phrase at one level (a scalar; 0 is best).

    Args:
        probs: [B, N] the phrase's attention per pixel.
        region: [N] its soft region (0..1).
        coverage_weight: weight of the coverage term.
    Returns:
        The batch mean of two terms, as in Attention Refocusing: the share of attention mass outside
        the region, and how unevenly the region is covered (1 - mean over region pixels of
        attention relative to its peak).
    """
    outside = 1.0 - phrase_attention_mass(probs, region)
    peak = probs.amax(-1, keepdim=True).clamp_min(1e-12)
    w = region / region.sum().clamp_min(1e-12)
    coverage = 1.0 - ((probs / peak) * w).sum(-1)
    return (outside + coverage_weight * coverage).mean()


def refocus_loss_over_layers(records: Sequence[PhraseAttention],
                             regions_at: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """The mean refocus loss over every recorded layer and phrase, on the positive-prompt rows.

    Args:
        records: one per cross-attention call of a forward pass.
        regions_at: (h, w) -> [P, h*w] regions of the phrases on that grid.
    Returns:
        A scalar tensor (differentiable through the records' probs). When a record has no
        positive row, all its rows count.
    Raises:
        HighlightError: nothing was recorded (no guided cross-attention ran).
    """
    losses = []
    for rec in records:
        regions = regions_at(*rec.grid).to(rec.probs[0].device)
        for i, pr in enumerate(rec.probs):
            sel = pr[rec.cond_rows] if bool(rec.cond_rows.any()) else pr
            losses.append(refocus_loss(sel.float(), regions[i]))
    if not losses:
        raise HighlightError("refocusing recorded no cross-attention maps: the model's cross-attention did not go "
                             "through the guide (another node replaces it); set refocus_percent to 0")
    return torch.stack(losses).mean()


def refocus_step(x: torch.Tensor, grad: torch.Tensor, step_size: float, sigma: float) -> torch.Tensor:
    """One refocusing move of the latent: against the gradient, RMS-normalised, scaled by the noise level.

    Args:
        x: the latent.
        grad: d loss / d x, same shape.
        step_size: size relative to ``sigma``.
        sigma: the current noise level.
    Returns:
        ``x - step_size * sigma * grad / rms(grad)`` (a zero gradient leaves x where it is).
    """
    g = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
    return x - step_size * sigma * g
