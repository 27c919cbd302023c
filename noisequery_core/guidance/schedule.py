"""When guidance acts during sampling: the guided range, its decay schedule, and the refocusing window."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HighlightError
from .attention import BIAS_INSIDE, BIAS_OUTSIDE

SCHEDULES = ("cosine", "linear", "constant")


def guidance_weight(percent: float, start: float, end: float, schedule: str = "cosine") -> float:
    """Weight (0..1) at sampling progress ``percent`` (0 = first step) inside [start, end], 0 outside.

    The weight decays over the range: from 1 at ``start`` to 0 at ``end`` ("linear", "cosine") or stays 1
    ("constant"). An empty range (end <= start) gives 0.

    Raises:
        HighlightError: unknown schedule name.
    """
    if schedule not in SCHEDULES:
        raise HighlightError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if end <= start or percent < start - 1e-9 or percent > end + 1e-9:
        return 0.0
    frac = min(max((percent - start) / (end - start), 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class GuideSettings:
    """How hard and when a highlight guide acts; progress is 0 at the first sampling step, 1 at the end."""

    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 0.6
    schedule: str = "cosine"
    softness: float = 0.5  # falloff beyond a stroke's edge (regions.stroke_map)
    inside: float = BIAS_INSIDE
    outside: float = BIAS_OUTSIDE
    refocus_steps_percent: float = 0.0  # refocus while start <= progress < start + this
    refocus_iterations: int = 0
    refocus_step_size: float = 0.05

    @property
    def refocuses(self) -> bool:
        """Whether refocusing runs at all."""
        return self.refocus_iterations > 0 and self.refocus_steps_percent > 0

    def weight_at(self, percent: float) -> float:
        """Bias weight at sampling progress ``percent``: strength times the schedule (guidance_weight)."""
        return self.strength * guidance_weight(percent, self.start_percent, self.end_percent, self.schedule)

    def refocus_at(self, percent: float) -> bool:
        """Whether the step at sampling progress ``percent`` is refocused."""
        if not self.refocuses:
            return False
        return self.start_percent - 1e-9 <= percent < self.start_percent + self.refocus_steps_percent
