"""Seed-invariant prompt on the tiny SD1.5 trained briefly on CPU (tests/host/trained_tiny.py), against the random
one's failings: its VAE round-trips photos far better than random weights (0.49) and its sampler does not run away.
The issue-16 render target (held-out seeds' renders move toward the liked image) is NOT met on it yet: the
second test states it and is a strict xfail, so it fails loudly once a better-trained model meets it
(bench/README.md, "Seed-invariant prompt", has the figures and why).

First run on a machine trains the model (371 s wall, 261 s CPU at load ~6 on 2 cores), cached in
~/.cache/noisequery/trained_tiny. With it cached: 105 s + 346 s (the xfail: 40 optimisation steps, 13 renders) at
load ~6.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import family_models
import numpy as np
import pytest
import trained_tiny

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

# The bench's settings (bench/bench_invariant.py MODELS["trained"]), fewer held-out seeds.
PROMPT = trained_tiny.SHARED_CAPTION
LIKED_SEED = 5
STEPS = 20
ITERS = 40
HELD_OUT = [10_000_000 + i for i in range(6)]


def _module(suffix: str) -> ModuleType:
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix) and "NoiseQuery" in name:
            return mod
    raise AssertionError(f"the NoiseQuery pack did not load ({suffix})")


@pytest.fixture(scope="module")
def trained(comfy_path: Path, comfy_nodes: ModuleType, tiny_checkpoint: Path) -> str:
    """ckpt_name of the trained tiny checkpoint, linked into the session's checkpoints folder."""
    src = trained_tiny.cached_trained_checkpoint(comfy_path)
    return family_models.link_checkpoint(src, tiny_checkpoint.parent).name


def test_trained_model_is_sane(trained: str, comfy_nodes: ModuleType) -> None:
    s = trained_tiny.sanity(comfy_nodes, trained, seeds=range(6))
    # the VAE round-trips its training photos (measured 0.14 of the 0..1 range; the random TAESD: 0.49)
    assert s["vae_round_trip"] < 0.2, s
    # renders are not runaway: an encoded photo has RMS 1 in the model's space (measured 1.7; the random model ~14)
    assert 0.3 < s["latent_rms"] < 3.0, s
    # the seed decides which training photo a render is nearest to (measured: 3 different ones over 6 seeds)
    assert s["distinct"] >= 2, s


def _render(nodes: ModuleType, model: Any, vae: Any, seed: int, positive: Any, size: int) -> Any:
    empty = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    lat = nodes.common_ksampler(model, seed, STEPS, 1.0, "euler", "normal", positive, positive, empty)[0]
    return vae.decode(lat["samples"])[..., :3].float().cpu()


@pytest.mark.xfail(strict=True, reason="issue 16 render target not met on the briefly trained tiny model: its UNet has "
                   "not learned to follow the text (bench --model trained: colour +8 %, layout +6 %)")
def test_tuned_prompt_moves_held_out_renders_toward_the_liked_image(trained: str, comfy_nodes: ModuleType,
                                                                      tmp_path: Path) -> None:
    import torch

    mod = _module("nodes.exploration_invariant_nodes")
    core = _module("noisequery_core.exploration.invariant")
    glue = _module("nodes._glue")
    size = trained_tiny.DEFAULT_CONFIG.size
    with torch.inference_mode():
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(trained)[:3]
        cond = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        liked = _render(comfy_nodes, model, vae, LIKED_SEED, cond, size)
        settings = core.InvariantSettings(iterations=ITERS, batch_size=4, learning_rate=0.05, prompt_weight=0.01,
                                          seed=0, checkpoint_every=ITERS)
        e, _ = mod.run_optimisation(model, vae, cond, liked, settings, tmp_path / "trained.safetensors", resume=False)
        tuned = mod.to_conditioning(e.tokens, dict(cond[0][1]))
        liked_u8 = glue.to_uint8(liked)[0]
        before, after = [], []
        for seed in HELD_OUT:
            before.append(core.appearance_distance(glue.to_uint8(_render(comfy_nodes, model, vae, seed, cond,
                                                                          size))[0], liked_u8))
            after.append(core.appearance_distance(glue.to_uint8(_render(comfy_nodes, model, vae, seed, tuned,
                                                                         size))[0], liked_u8))
    assert e.held_out["after"] < 0.8 * e.held_out["before"], e.held_out
    (cb, lb), (ca, la) = np.mean(before, axis=0), np.mean(after, axis=0)
    # the bench (bench/bench_invariant.py --model trained) measures the drops; here a margin well inside them
    assert ca < 0.8 * cb, f"colour distance to the liked image {cb:.2f} -> {ca:.2f} (ΔE00), per seed {before} {after}"
    assert la < 0.8 * lb, f"layout distance to the liked image {lb:.2f} -> {la:.2f} (ΔE00), per seed {before} {after}"
