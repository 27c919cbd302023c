"""Variation explorer (noisequery_core.exploration.explore): derivation, history format, exact replay."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from noisequery_core.exploration.explore import (
    HISTORY_VERSION,
    History,
    HistoryError,
    Pick,
    candidates,
    derive_seed,
    replay_noise,
    replay_tokens,
    variant_noises,
    variant_tokens,
)
from noisequery_core.noise import seed_noise

SHAPE = (4, 32, 32)


def test_derived_seeds_are_fixed_values() -> None:
    """Pinned: a change here would make every saved walk replay differently (bump DERIVATION instead)."""
    assert derive_seed(42, 0, 0) == derive_seed(42, 0, 0)
    assert len({derive_seed(42, k, j) for k in range(4) for j in range(8)}) == 32
    assert derive_seed(42, 0, 0, "cond") != derive_seed(42, 0, 0)
    assert derive_seed(42, 0, 0) == 0xC01E6AB42D5FE904
    assert 0 <= derive_seed(2**64 - 1, 3, 9) < 2**64


def test_empty_history_is_the_start_seed() -> None:
    h = History.parse("", 7)
    assert h.round == 0 and h.start_seed == 7
    assert torch.equal(replay_noise(h, SHAPE), seed_noise(7, SHAPE))


def test_pick_then_replay_from_json_is_bit_for_bit() -> None:
    h = History.parse("", 123)
    tokens = torch.randn(1, 77, 64)
    for strength, cond_strength, idx in ((0.3, 0.1, 2), (0.15, 0.0, 0), (0.5, 0.25, 3)):
        offers = candidates(h, 4, strength, cond_strength)
        noises = variant_noises(h, offers, SHAPE)
        toks = variant_tokens(h, offers, tokens)
        h = h.with_pick(offers[idx])
        # picking variant idx makes it the current state exactly
        assert torch.equal(replay_noise(h, SHAPE), noises[idx])
        assert torch.equal(replay_tokens(h, tokens), toks[idx:idx + 1])
    text = h.to_json()
    doc = json.loads(text)
    assert doc["format"] == "noisequery.explore" and doc["version"] == HISTORY_VERSION
    assert [p["index"] for p in doc["picks"]] == [2, 0, 3]
    again = History.parse(text, 123)
    assert again == h
    assert torch.equal(replay_noise(again, SHAPE), replay_noise(h, SHAPE))
    assert torch.equal(replay_tokens(again, tokens), replay_tokens(h, tokens))
    # the replay uses the stored seeds and strengths, not the current widgets: changing what the node would
    # offer now does not change the replayed state
    assert candidates(again, 2, 0.9)[0].strength == 0.9
    assert torch.equal(replay_noise(again, SHAPE), replay_noise(h, SHAPE))


def test_variants_keep_noise_statistics() -> None:
    h = History.parse("", 5)
    noises = variant_noises(h, candidates(h, 6, 0.4), (4, 64, 64))
    for x in noises:
        assert abs(float(x.std()) - 1.0) < 0.02 and abs(float(x.mean())) < 5 / math.sqrt(x.numel())
    # strength 0: every variant is the current noise; strength 1: the fresh seeds' noises exactly
    same = variant_noises(h, candidates(h, 3, 0.0), SHAPE)
    assert all(torch.equal(x, seed_noise(5, SHAPE)) for x in same)
    offers = candidates(h, 3, 1.0)
    fresh = variant_noises(h, offers, SHAPE)
    assert all(torch.equal(x, seed_noise(p.seed, SHAPE)) for x, p in zip(fresh, offers))


def test_prompt_moves_have_the_asked_norm() -> None:
    tokens = torch.randn(1, 77, 64)
    h = History.parse("", 1)
    offers = candidates(h, 3, 0.2, cond_strength=0.25)
    out = variant_tokens(h, offers, tokens)
    assert out.shape == (3, 77, 64)
    moved = (out - tokens).norm(dim=-1) / tokens.norm(dim=-1)
    assert torch.allclose(moved, torch.full_like(moved, 0.25), atol=1e-5)
    assert not torch.equal(out[0], out[1])
    # zero strength leaves the prompt untouched
    assert torch.equal(variant_tokens(h, candidates(h, 2, 0.2, 0.0), tokens), tokens.repeat(2, 1, 1))


@pytest.mark.parametrize(("text", "words"), [
    ("{not json", "not valid JSON"),
    ('{"format": "other", "version": 1}', "format"),
    ('{"format": "noisequery.explore", "version": 99, "start_seed": 1, "picks": []}', "version 99"),
    ('{"format": "noisequery.explore", "version": 1, "start_seed": 1, "picks": [{"index": 0}]}', "damaged"),
    ('{"format": "noisequery.explore", "version": 1, "start_seed": 1, '
     '"picks": [{"index": 0, "seed": -4, "strength": 0.1}]}', "damaged"),
])
def test_bad_histories_are_refused_with_a_fix(text: str, words: str) -> None:
    with pytest.raises(HistoryError, match=words) as info:
        History.parse(text, 1)
    assert "clear" in str(info.value) or "update" in str(info.value)


def test_history_from_another_seed_is_refused() -> None:
    h = History(10, (Pick(1, 555, 0.2),))
    with pytest.raises(HistoryError, match="starts from seed 10, but the seed input is 11"):
        History.parse(h.to_json(), 11)
    # an empty history carries no commitment: any seed starts a new walk
    assert History.parse(History(10).to_json(), 11).start_seed == 11


def test_half_precision_tokens_keep_their_dtype() -> None:
    tokens = torch.randn(1, 77, 64).half()
    h = History.parse("", 3)
    out = variant_tokens(h, candidates(h, 2, 0.2, 0.1), tokens)
    assert out.dtype == torch.float16 and out.shape == (2, 77, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize(("pick", "words"), [
    ('{"index": 0, "seed": 4, "strength": NaN}', "pick 0 strength is NaN"),
    ('{"index": 0, "seed": 4, "strength": Infinity}', "pick 0 strength is +infinity"),
    ('{"index": 0, "seed": 4, "strength": 1.5}', "pick 0 strength is 1.5, above the maximum 1"),
    ('{"index": 0, "seed": 4, "strength": 0.2, "cond_strength": -Infinity}', "pick 0 cond_strength is -infinity"),
    ('{"index": 0, "seed": 4, "strength": 0.2, "cond_strength": NaN}', "pick 0 cond_strength is NaN"),
])
def test_non_finite_history_numbers_are_refused(pick: str, words: str) -> None:
    """NaN is valid JSON for Python clients and passes every range test; such a pick renders black."""
    text = f'{{"format": "noisequery.explore", "version": 1, "start_seed": 1, "picks": [{pick}]}}'
    with pytest.raises(HistoryError, match=re.escape(words)) as info:
        History.parse(text, 1)
    assert "clear the history" in str(info.value)


@pytest.mark.parametrize(("strength", "cond_strength"), [(math.nan, 0.0), (0.3, math.inf), (-0.1, 0.0), (0.3, 2.5)])
def test_non_finite_strengths_never_reach_a_pick(strength: float, cond_strength: float) -> None:
    h = History.parse("", 7)
    with pytest.raises(HistoryError, match="variation (cond_)?strength"):
        candidates(h, 3, strength, cond_strength)
    # the history a pick would be written back into stays parseable JSON without NaN
    ok = h.with_pick(candidates(h, 3, 0.3, 0.1)[1])
    assert "NaN" not in ok.to_json() and History.parse(ok.to_json(), 7) == ok


def _history(start_seed: str, picks: str = "[]") -> str:
    return ('{"format": "noisequery.explore", "version": ' + str(HISTORY_VERSION)
            + ', "start_seed": ' + start_seed + ', "picks": ' + picks + "}")


@pytest.mark.parametrize("doc", [
    "[" * 200_000,  # deeper than Python's JSON parser goes
    _history("Infinity"),
    _history("5", '[{"index": 0, "seed": 1e30, "strength": 0.3}]'),
    _history("5", '[{"index": 0.5, "seed": 3, "strength": 0.3}]'),
    _history("-1"),
])
def test_hostile_history_is_refused_with_a_sentence(doc: str) -> None:
    with pytest.raises(HistoryError, match="clear the history"):
        History.parse(doc, 5)
