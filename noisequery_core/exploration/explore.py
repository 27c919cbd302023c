"""Variation explorer: variants around the current noise/prompt, a pick, and a history that replays bit for bit.

A walk starts from one seed's KSampler noise. Each round offers N variants; variant j of round k is the current
noise slerped (noisequery_core.exploration.interp) toward the noise of a fresh seed derived from (start seed, k, j), at the
round's strength, and optionally the current prompt embedding moved along a random direction (seeded the same
way) by cond_strength times each token's norm. Picking variant j makes it the current state.

The history is JSON (a STRING widget in the workflow). Every pick stores the fresh seeds and strengths it was
made with, so replaying needs no derivation at all and gives the same tensors bit for bit, whatever the widgets
say later. Format (versioned; readers refuse unknown versions)::

    {"format": "noisequery.explore", "version": 1, "start_seed": 42,
     "picks": [{"index": 2, "seed": 1234, "strength": 0.3, "cond_seed": 99, "cond_strength": 0.0}, ...]}

Derived seeds come from SHA-256 of ``noisequery.explore/v1:<start>:<round>:<index>:<what>``: stable across
machines, Python versions and torch versions (torch only draws the Gaussian noise, as KSampler does).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..checks import finite
from ..errors import NoiseQueryError
from ..noise import SEED_MAX, seed_noise
from .interp import slerp

HISTORY_FORMAT = "noisequery.explore"
HISTORY_VERSION = 1
DERIVATION = "noisequery.explore/v1"
# A variant's noise strength is a slerp factor (0 = the current noise, 1 = the fresh seed's); its prompt strength is
# relative to each token's norm. Both are refused outside these ranges (and when NaN/inf) wherever they enter: the
# node's widgets (nodes/exploration_variation_nodes.py uses these bounds), candidates() and a parsed history.
STRENGTH_MAX = 1.0
COND_STRENGTH_MAX = 2.0


class HistoryError(NoiseQueryError):
    """An exploration history that cannot be read or does not fit the node's inputs."""


def derive_seed(start_seed: int, round_index: int, index: int, what: str = "noise") -> int:
    """A 64-bit seed for variant ``index`` of round ``round_index`` of the walk starting at ``start_seed``."""
    key = f"{DERIVATION}:{int(start_seed) & SEED_MAX}:{int(round_index)}:{int(index)}:{what}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & SEED_MAX


@dataclass(frozen=True)
class Pick:
    """One chosen variant: which one, and everything needed to rebuild it without derivation."""

    index: int
    seed: int
    strength: float
    cond_seed: int = 0
    cond_strength: float = 0.0


@dataclass(frozen=True)
class History:
    """The start seed and the picks made so far (round k's pick is picks[k])."""

    start_seed: int
    picks: tuple[Pick, ...] = field(default_factory=tuple)

    @property
    def round(self) -> int:
        """Index of the round whose variants are offered now."""
        return len(self.picks)

    def with_pick(self, pick: Pick) -> History:
        return replace(self, picks=(*self.picks, pick))

    def to_json(self) -> str:
        """Compact, key-ordered JSON (one line: fits a STRING widget and diffs well)."""
        doc = {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "start_seed": int(self.start_seed),
               "picks": [asdict(p) for p in self.picks]}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str, start_seed: int) -> History:
        """Read a history; empty text is a new walk from ``start_seed``.

        Raises HistoryError for malformed JSON, another format, a newer version, bad picks, or a history that
        starts from another seed than ``start_seed`` (replaying it from a different seed would silently give
        another walk).
        """
        if not (text or "").strip():
            return cls(int(start_seed))
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HistoryError(f"exploration history is not valid JSON ({exc.msg} at character {exc.pos}); "
                               "clear the history widget to start a new walk.") from None
        except RecursionError:  # nesting deeper than Python's parser goes: a hostile or broken workflow
            raise HistoryError("exploration history is nested too deeply to be a history; "
                               "clear the history widget to start a new walk.") from None
        if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT:
            raise HistoryError(f"exploration history: expected an object with \"format\": \"{HISTORY_FORMAT}\"; "
                               "clear the history widget to start a new walk.")
        version = doc.get("version")
        if version != HISTORY_VERSION:
            raise HistoryError(f"exploration history version {version!r} is not supported (this NoiseQuery reads "
                               f"version {HISTORY_VERSION}); update NoiseQuery or clear the history.")
        try:
            start = _seed_from(doc["start_seed"], "start_seed")
            picks = tuple(_pick_from(p, i) for i, p in enumerate(doc.get("picks", [])))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise HistoryError(f"exploration history is damaged ({exc}); clear the history widget to start over.") from None
        if picks and start != int(start_seed):
            raise HistoryError(
                f"the exploration history starts from seed {start}, but the seed input is {start_seed}. Set the seed "
                f"back to {start} to continue that walk, or clear the history to start a new one from {start_seed}.")
        return cls(int(start_seed), picks)


def _int_from(value: Any, what: str, lo: int, hi: int) -> int:
    """A whole number lo..hi from history JSON (no bools, fractions, NaN or infinities), else HistoryError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")) \
            or int(value) != value or not lo <= int(value) <= hi:
        raise HistoryError(f"exploration history: {what} is {value!r}, not a whole number from {lo} to {hi}; "
                           "the history is damaged: clear the history widget to start a new walk.")
    return int(value)


def _seed_from(value: Any, what: str) -> int:
    return _int_from(value, what, 0, SEED_MAX)


def _pick_from(p: Any, i: int) -> Pick:
    if not isinstance(p, dict):
        raise HistoryError(f"exploration history: pick {i} is {type(p).__name__}, not an object with index/seed/"
                           "strength; clear the history widget to start over.")
    fix = "the history is damaged; clear the history widget to start a new walk."
    pick = Pick(index=_int_from(p["index"], f"pick {i} index", 0, 1 << 20), seed=_seed_from(p["seed"], f"pick {i} seed"),
                strength=finite(p["strength"], f"exploration history: pick {i} strength", lo=0.0, hi=STRENGTH_MAX,
                                fix=fix, error=HistoryError),
                cond_seed=_seed_from(p.get("cond_seed", 0), f"pick {i} cond_seed"),
                cond_strength=finite(p.get("cond_strength", 0.0), f"exploration history: pick {i} cond_strength",
                                     lo=0.0, hi=COND_STRENGTH_MAX, fix=fix, error=HistoryError))
    if not 0 <= pick.seed <= SEED_MAX or not 0 <= pick.cond_seed <= SEED_MAX:
        raise HistoryError(f"exploration history: pick {i} has a seed outside 0..{SEED_MAX} (seed {pick.seed}, "
                           f"cond_seed {pick.cond_seed}); the history is damaged, clear it to start over.")
    return pick


def candidates(history: History, count: int, strength: float, cond_strength: float = 0.0) -> list[Pick]:
    """The ``count`` variants offered in the history's current round (each is the Pick it would become).

    Raises HistoryError when a strength is NaN, infinite or outside 0..STRENGTH_MAX / 0..COND_STRENGTH_MAX (such a
    pick would render black and be written into the history).
    """
    strength = finite(strength, "variation strength", lo=0.0, hi=STRENGTH_MAX, error=HistoryError)
    cond_strength = finite(cond_strength, "variation cond_strength", lo=0.0, hi=COND_STRENGTH_MAX, error=HistoryError)
    k = history.round
    return [Pick(index=j, seed=derive_seed(history.start_seed, k, j), strength=strength,
                 cond_seed=derive_seed(history.start_seed, k, j, "cond"), cond_strength=cond_strength)
            for j in range(count)]


# ------------------------------------------------------------------ noise


def step_noise(current: torch.Tensor, pick: Pick) -> torch.Tensor:
    """The noise after ``pick``: current slerped toward the pick's fresh seed noise (same shape and dtype)."""
    fresh = seed_noise(pick.seed, tuple(current.shape), current.dtype)
    return slerp(current, fresh, pick.strength)


def replay_noise(history: History, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The current noise (one latent item of ``shape`` C, H, W) after replaying every pick."""
    x = seed_noise(history.start_seed, tuple(shape), dtype)
    for p in history.picks:
        x = step_noise(x, p)
    return x


def variant_noises(history: History, offers: Sequence[Pick], shape: Sequence[int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(offers), *shape]: item j is exactly the current noise of ``history.with_pick(offers[j])``."""
    current = replay_noise(history, shape, dtype)
    return torch.stack([step_noise(current, p) for p in offers])


# ------------------------------------------------------------------ prompt embedding


def _direction(seed: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A random direction per row of the last dimension, each row of unit norm."""
    d = seed_noise(seed, tuple(shape), torch.float32).double()
    return (d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(dtype)


def step_tokens(tokens: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """tokens + strength * |token| * (random unit direction per token); strength 0 returns the input unchanged.

    The direction depends on ``seed`` and the tensor's shape only, so the same prompt replays the same walk.
    """
    if float(strength) == 0.0:
        return tokens
    x = tokens.double()
    # drawn on the CPU (as every NoiseQuery noise, so it does not depend on the device), then moved to the tokens'
    d = _direction(seed, tuple(tokens.shape), torch.float64).to(tokens.device)
    return (x + float(strength) * x.norm(dim=-1, keepdim=True) * d).to(tokens.dtype)


def replay_tokens(history: History, tokens: torch.Tensor, what: str = "tokens") -> torch.Tensor:
    """The prompt tensor (tokens [B, T, D] or pooled [B, D]) after every pick's random move.

    ``what`` separates the pooled output's directions from the tokens' (different derived seeds).
    """
    x = tokens
    for p in history.picks:
        x = step_tokens(x, cond_seed_for(p.cond_seed, what), p.cond_strength)
    return x


def cond_seed_for(cond_seed: int, what: str) -> int:
    """The seed of the direction for one part of the conditioning (token rows or pooled vector)."""
    if what == "tokens":
        return cond_seed
    return int.from_bytes(hashlib.sha256(f"{DERIVATION}:{cond_seed}:{what}".encode()).digest()[:8], "big")


def variant_tokens(history: History, offers: Sequence[Pick], tokens: torch.Tensor, what: str = "tokens") -> torch.Tensor:
    """[len(offers) * B, ...]: item j is exactly the replayed tensor of ``history.with_pick(offers[j])``."""
    current = replay_tokens(history, tokens, what)
    return torch.cat([step_tokens(current, cond_seed_for(p.cond_seed, what), p.cond_strength) for p in offers])


def describe(history: History, offers: Sequence[Pick]) -> str:
    """A short human-readable summary for the node's report."""
    lines = [f"walk from seed {history.start_seed}: {history.round} pick(s) so far"]
    for k, p in enumerate(history.picks):
        cond = f", prompt move {p.cond_strength:g}" if p.cond_strength else ""
        lines.append(f"  round {k}: picked #{p.index} (toward seed {p.seed} at {p.strength:g}{cond})")
    if offers:
        lines.append(f"round {history.round}: {len(offers)} variants at strength {offers[0].strength:g}"
                     + (f", prompt move {offers[0].cond_strength:g}" if offers[0].cond_strength else ""))
    return "\n".join(lines)
