"""Seed influence maths (noisequery_core.exploration.influence) and the family field of the generation key."""
from __future__ import annotations

import json

import numpy as np
import pytest

from noisequery_core import GenerationKey, Library
from noisequery_core.errors import Cancelled
from noisequery_core.exploration.influence import (
    GRID,
    InfluenceError,
    layout_features,
    measure_influence,
    seed_influence,
    variance_split,
)
from noisequery_core.search.features import feature_set

H = W = 32


def _blob(cx: float, cy: float, colour: tuple[float, float, float]) -> np.ndarray:
    """A bright disc at (cx, cy) (fractions of the image) of `colour` on a dark background, [H, W, 3] float."""
    yy, xx = np.mgrid[0:H, 0:W] / H
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.04).astype(np.float32)
    img = 0.1 + mask[..., None] * (np.array(colour, dtype=np.float32) - 0.1)
    return img.astype(np.float32)


POSITIONS = [(0.2, 0.2), (0.8, 0.3), (0.3, 0.8), (0.75, 0.75)]
COLOURS = [(1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.2, 0.3, 1.0)]


def _renders(where: str, rng: np.random.Generator, noise: float = 0.01) -> np.ndarray:
    """[3 prompts, 4 seeds, H, W, 3]: the disc's position follows the seed or the prompt; colour the other."""
    out = np.zeros((len(COLOURS), len(POSITIONS), H, W, 3), np.float32)
    for p in range(len(COLOURS)):
        for s in range(len(POSITIONS)):
            pos = POSITIONS[s] if where == "seed" else POSITIONS[p]
            col = COLOURS[p] if where == "seed" else COLOURS[s % len(COLOURS)]
            out[p, s] = _blob(*pos, col)
    return np.clip(out + rng.normal(0, noise, out.shape).astype(np.float32), 0, 1)


def test_layout_follows_the_seed() -> None:
    rep = seed_influence(_renders("seed", np.random.default_rng(0)))
    assert rep.layout.seed > 0.9 and rep.layout.prompt < 0.05
    assert rep.verdict == "strong"
    assert "carry over" in rep.meaning()
    # colour follows the prompt here
    assert rep.colour.prompt > rep.colour.seed


def test_layout_follows_the_prompt() -> None:
    rep = seed_influence(_renders("prompt", np.random.default_rng(1)))
    assert rep.layout.seed < 0.05 and rep.layout.prompt > 0.9
    assert rep.verdict == "weak"
    assert "prompt, not the seed" in rep.meaning()
    assert "layout: seed" in rep.text() and "3 prompts x 4 seeds" in rep.text()


def test_pure_noise_sits_at_chance() -> None:
    """No seed or prompt effect: the seed share scatters around (S-1)/(P*S-1), and 'above chance' near 0."""
    rng = np.random.default_rng(2)
    shares = []
    for _ in range(40):
        x = rng.normal(size=(3, 4, 16))
        shares.append(variance_split(x).seed)
    chance = variance_split(rng.normal(size=(3, 4, 16))).chance
    assert chance == pytest.approx(3 / 11)
    assert abs(float(np.mean(shares)) - chance) < 0.05


def test_split_shares_sum_to_one_and_match_hand_computation() -> None:
    x = np.array([[[1.0], [3.0]], [[2.0], [6.0]]])  # prompts x seeds x 1
    sp = variance_split(x)
    # grand 3; prompt means 2, 4 -> SS_p = 2*(1+1) = 4; seed means 1.5, 4.5 -> SS_s = 2*(2.25+2.25) = 9; total 14
    assert sp.seed == pytest.approx(9 / 14) and sp.prompt == pytest.approx(4 / 14) and sp.rest == pytest.approx(1 / 14)
    assert sp.seed + sp.prompt + sp.rest == pytest.approx(1.0)


def test_identical_renders_give_zero_not_nan() -> None:
    rep = seed_influence(np.full((2, 2, H, W, 3), 128, np.uint8))
    assert rep.layout.seed == 0.0 and rep.verdict == "weak"


def test_layout_ignores_brightness() -> None:
    img = _blob(0.3, 0.3, (1.0, 1.0, 1.0))
    a, b = layout_features(img), layout_features(img * 0.5)
    assert a.shape == (GRID * GRID,)
    assert np.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("bad", [
    np.zeros((1, 4, H, W, 3), np.uint8),  # one prompt
    np.zeros((3, 1, H, W, 3), np.uint8),  # one seed
    np.zeros((2, 2, H, W), np.uint8),  # no channel axis
    np.zeros((2, 2, 4, 4, 3), np.uint8),  # smaller than the grid
    np.full((2, 2, H, W, 3), np.nan, np.float32),
])
def test_bad_renders_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(InfluenceError):
        seed_influence(bad)


def test_measure_influence_drives_the_renderer_and_stops_on_cancel() -> None:
    calls: list[tuple[int, list[int]]] = []
    renders = (_renders("seed", np.random.default_rng(3)) * 255).astype(np.uint8)

    def render(i: int, seeds: list[int]) -> list[np.ndarray]:
        calls.append((i, seeds))
        return [renders[i, k] for k in range(len(seeds))]

    seen: list[tuple[int, int]] = []
    rep, got = measure_influence(render, 3, [10, 11, 12, 13], progress=lambda d, t, m="": seen.append((d, t)))
    assert calls == [(0, [10, 11, 12, 13]), (1, [10, 11, 12, 13]), (2, [10, 11, 12, 13])]
    assert got.shape == (3, 4, H, W, 3) and rep.verdict == "strong"
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)

    n = {"c": 0}

    def cancel() -> None:
        n["c"] += 1
        if n["c"] == 2:
            raise Cancelled("stop")

    calls.clear()
    with pytest.raises(Cancelled):
        measure_influence(render, 3, [10, 11, 12, 13], check_cancel=cancel)
    assert len(calls) == 1  # stopped before the second prompt

    with pytest.raises(InfluenceError, match="returned 1 images for 2 seeds"):
        measure_influence(lambda i, s: [renders[0, 0]], 2, [1, 2])


# ------------------------------------------------------------------ the family in the generation key


def test_generation_key_records_family_and_old_manifests_read(tmp_path) -> None:
    gen = GenerationKey(model="flux.safetensors", latent_shape=(16, 8, 8), family="Flux:flux")
    lib = Library.create(tmp_path / "lib", gen, feature_set(None))
    assert Library.open(lib.path).generation.family == "Flux:flux"
    assert "family=Flux:flux" in lib.generation.describe()
    manifest = lib.path / "manifest.json"
    d = json.loads(manifest.read_text())
    assert d["generation"]["family"] == "Flux:flux"
    # A manifest from before the field existed opens as family unknown, and stays extendable by the same settings.
    del d["generation"]["family"]
    manifest.write_text(json.dumps(d))
    old = Library.open(lib.path)
    assert old.generation.family == ""
    assert Library.create(lib.path, gen, feature_set(None)).generation.family == ""
    d["generation"]["family"] = 7
    manifest.write_text(json.dumps(d))
    with pytest.raises(Exception, match="generation.family"):
        Library.open(lib.path)
