"""The seed-invariant prompt does what it is for, on a model where that can be seen: the briefly trained tiny SD1.5
(tests/host/trained_tiny.py), whose "a photo" renders one of a few memorised photos depending on the seed. A liked
render of one seed, tuned into prompt tokens by NoiseQuerySeedInvariantPrompt through ComfyUI's executor, carries
to seeds the run never drew: stock KSampler renders of held-out seeds with the tuned CONDITIONING come much closer to
the liked image (colour and layout distance, the library's colour features) than with the prompt, and the liked
image's denoising loss on the node's held-out seeds drops. Also: the model is what it claims against the random
one's failings (its VAE round-trips photos, its sampler does not run away, the seed decides the photo).

Measured on this machine (bench/bench_invariant.py, defaults, 8 liked seeds x 8 held-out seeds; bench/README.md):
colour distance -62 % to -84 %, layout -53 % to -80 % for every liked seed; the liked seed used here, 1: loss -53 %,
colour -84 %, layout -80 %. The asserted margins are 30 % (the issue's target), room for another CPU's last bits.

First run on a machine trains the model (~6 min on 2 quiet cores), cached in ~/.cache/noisequery/trained_tiny.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import family_models
import nq_graphs as G
import nq_training as T
import pytest
import trained_tiny
from comfy_harness import InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

LIKED_SEED = 1
HELD_OUT = [10_000_000 + i for i in range(4)]  # KSampler seeds no training iteration drew
STEPS, CFG, SIZE = 20, 4.0, 32  # the bench's renders: euler / normal, cfg 4 with the empty negative
NODE = "10"


@pytest.fixture(scope="module")
def trained(comfy_path: Path, comfy_nodes: ModuleType, tiny_checkpoint: Path) -> str:
    """ckpt_name of the trained tiny checkpoint, linked into the session's checkpoints folder."""
    src = trained_tiny.cached_trained_checkpoint(comfy_path)
    return family_models.link_checkpoint(src, tiny_checkpoint.parent).name


def test_trained_model_is_sane(trained: str, comfy_nodes: ModuleType) -> None:
    s = trained_tiny.sanity(comfy_nodes, trained, seeds=range(6))
    # the VAE round-trips its training photos (measured 0.14 of the 0..1 range; the random TAESD: 0.49)
    assert s["vae_round_trip"] < 0.2, s
    # renders are not runaway: an encoded photo has RMS 1 in the model's space (the random model: ~14)
    assert 0.3 < s["latent_rms"] < 3.0, s
    # the seed decides which training photo a render is nearest to (measured: 3 different ones over 6 seeds)
    assert s["distinct"] >= 2, s


def _render(prefix: str, seed: int, positive: list[Any]) -> dict[str, Any]:
    g = G.ksampler_image(prefix, seed, steps=STEPS, cfg=CFG, negative=G.NEG, size=SIZE, output=False)
    g[f"{prefix}1"]["inputs"]["positive"] = positive
    g[f"{prefix}3"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}2", 0]}}
    return g


def test_tuned_prompt_carries_the_liked_image_to_held_out_seeds(trained: str, comfy_runner: InProcessRunner,
                                                                comfy_nodes: ModuleType,
                                                                nq_embeddings_dir: Path) -> None:
    g = G.base(trained, positive=trained_tiny.SHARED_CAPTION, negative="")
    g.update(_render("4", LIKED_SEED, [G.POS, 0]))  # the liked image: node "42"
    g[NODE] = {"class_type": "NoiseQuerySeedInvariantPrompt", "inputs": {
        "model": [G.CKPT, 0], "vae": [G.CKPT, 2], "conditioning": [G.POS, 0], "image": ["42", 0],
        "name": "trained/liked1", "iterations": 100, "batch_size": 4, "learning_rate": 0.01, "prompt_weight": 0.01,
        "t_min": 0, "t_max": 999, "seed": 0, "checkpoint_every": 100, "resume": False}}
    for i, seed in enumerate(HELD_OUT):
        g.update(_render(f"5{i}", seed, [G.POS, 0]))  # the prompt
        g.update(_render(f"6{i}", seed, [NODE, 0]))  # the tuned tokens
    T.ok(comfy_runner.run(g))

    mod = G.pack_module(comfy_nodes, "noisequery_core.exploration.invariant")
    glue = G.pack_module(comfy_nodes, "nodes._glue")
    liked = glue.to_uint8(comfy_runner.node_outputs("42")[0])[0]

    def distances(prefix: str) -> tuple[float, float]:
        d = [mod.appearance_distance(glue.to_uint8(comfy_runner.node_outputs(f"{prefix}{i}2")[0])[0], liked)
             for i in range(len(HELD_OUT))]
        return sum(c for c, _ in d) / len(d), sum(l_ for _, l_ in d) / len(d)

    (colour_before, layout_before), (colour_after, layout_after) = distances("5"), distances("6")
    e = mod.load_embedding(nq_embeddings_dir / "trained" / "liked1.safetensors")
    before, after = e.held_out["before"], e.held_out["after"]
    figures = (f"loss {before:.3f} -> {after:.3f}, colour {colour_before:.1f} -> {colour_after:.1f}, "
               f"layout {layout_before:.1f} -> {layout_after:.1f}")
    assert after <= 0.7 * before, figures
    assert colour_after <= 0.7 * colour_before, figures
    assert layout_after <= 0.7 * layout_before, figures
