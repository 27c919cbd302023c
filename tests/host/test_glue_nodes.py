"""The pack's shared glue (nodes/_glue.py) inside a real ComfyUI, in-process.

Covered: the NOISE of every pack node that outputs one honours a LATENT's batch_index as ComfyUI's own RandomNoise
does (a latent cut from a batch gets those items' noise), checked on the tensors and end to end through
LatentFromBatch -> SamplerCustomAdvanced against KSampler; IMAGE <-> uint8/PIL conversions round and round-trip.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
from comfy_harness import InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

LIB = "inproc/glue_clip"  # CLIP ViT-B-32 (random weights), 64 x 64, seeds 100..103
SHAPE = (4, G.SIZE // 8, G.SIZE // 8)
# Latent items' positions in their batch: out of order, repeated, past the NOISE's item count (a larger batch).
POSITIONS = ([2, 0], [1], [0, 0, 2], [4, 1])


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in entry, f"graph refused: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{err['node_type']} failed: {err.get('exception_message')}"
    return entry


@pytest.fixture(scope="module")
def library(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_weights: Any) -> str:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(LIB, seed_start=100, count=4, batch_size=4, clip_model="ViT-B-32:openai")
    _ok(comfy_runner.run(graph))
    return LIB


@pytest.fixture(scope="module")
def pack_noises(comfy_nodes: ModuleType, library: str) -> dict[str, Any]:
    """One NOISE from each output of the pack's nodes that has one (their execute, in-process)."""
    import torch

    nodes = comfy_nodes.NODE_CLASS_MAPPINGS
    query = {"top_k": 3, "rank_offset": 0, "diversity": 0.0, "exclude_seeds": ""}
    positive = [[torch.zeros(1, 77, 768), {}]]
    with torch.inference_mode():
        text = nodes["NoiseQueryText"].execute(library=library, text="a red apple", negative_text="", text_weight=1.0,
                                               negative_weight=0.5, **query).args
        colour = nodes["NoiseQueryColor"].execute(**G.color_query(library, **query)["inputs"]).args
        slerp = nodes["NoiseQuerySeedSlerp"].execute(seed_a=5, seed_b=6, steps=3, t_start=0.0, t_end=1.0,
                                                     width=G.SIZE, height=G.SIZE).args
        grid = nodes["NoiseQuerySeedGrid"].execute(seed_top_left=1, seed_top_right=2, seed_bottom_left=3,
                                                   seed_bottom_right=4, rows=2, columns=2, width=G.SIZE,
                                                   height=G.SIZE).args
        explore = nodes["NoiseQueryVariations"].execute(seed=9, positive=positive, variants=3, strength=0.3,
                                                        cond_strength=0.0, width=G.SIZE, height=G.SIZE, pick=-1,
                                                        history="").args
        rank = nodes["NoiseQueryRank"].execute(images=colour[3], text="a red apple", clip_model="ViT-B-32:openai",
                                               clip_weight=1.0, aesthetic_model="none", aesthetic_weight=1.0,
                                               noise=colour[1]).args
    return {"NoiseQueryText.noise": text[1], "NoiseQueryColor.noise": colour[1], "NoiseQuerySeedSlerp.noise": slerp[0],
            "NoiseQuerySeedGrid.noise": grid[0], "NoiseQueryVariations.noise": explore[0],
            "NoiseQueryVariations.current_noise": explore[3], "NoiseQueryRank.best_noise": rank[3]}


def _assert_honours_batch_index(noise: Any, positions: Sequence[Sequence[int]] = POSITIONS) -> None:
    """generate_noise of a latent with batch_index == those items of the whole batch's noise."""
    import torch

    for idx in positions:
        whole = noise.generate_noise({"samples": torch.zeros(max(idx) + 1, *SHAPE)})
        got = noise.generate_noise({"samples": torch.zeros(len(idx), *SHAPE), "batch_index": list(idx)})
        assert got.shape == (len(idx), *SHAPE) and got.dtype == torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, whole[list(idx)]), f"batch_index {idx}"


def test_comfyuis_random_noise_is_the_reference(comfy_nodes: ModuleType) -> None:
    """The property checked below is the one ComfyUI's RandomNoise has (so the pack's NOISE behaves the same)."""
    import torch
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    noise = Noise_RandomNoise(77)
    _assert_honours_batch_index(noise)
    plain = noise.generate_noise({"samples": torch.zeros(2, *SHAPE)})
    assert not torch.equal(plain, noise.generate_noise({"samples": torch.zeros(2, *SHAPE), "batch_index": [1, 0]}))


@pytest.mark.parametrize("output", ["NoiseQueryText.noise", "NoiseQueryColor.noise", "NoiseQuerySeedSlerp.noise",
                                    "NoiseQuerySeedGrid.noise", "NoiseQueryVariations.noise",
                                    "NoiseQueryVariations.current_noise", "NoiseQueryRank.best_noise"])
def test_pack_noise_honours_batch_index_like_random_noise(pack_noises: dict[str, Any], output: str) -> None:
    _assert_honours_batch_index(pack_noises[output])


def test_query_noise_items_by_batch_index_are_the_hits_ksampler_noise(pack_noises: dict[str, Any]) -> None:
    import comfy.sample
    import torch

    noise = pack_noises["NoiseQueryColor.noise"]
    got = noise.generate_noise({"samples": torch.zeros(2, *SHAPE), "batch_index": [2, 4]})
    for item, position in enumerate((2, 4)):
        seed = noise.seeds[position % len(noise.seeds)]
        assert torch.equal(got[item], comfy.sample.prepare_noise(torch.zeros(1, *SHAPE), seed)[0]), position


def test_latent_from_batch_renders_that_hit(comfy_runner: InProcessRunner, tiny_ckpt_name: str, library: str,
                                            pack_noises: dict[str, Any]) -> None:
    """LatentFromBatch(item 1) of a query's latent, sampled with the query's NOISE, is hit 1's KSampler image."""
    hit = pack_noises["NoiseQueryColor.noise"].seeds[1]
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.color_query(library, top_k=3)
    graph["30"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["20", 2], "batch_index": 1, "length": 1}}
    graph.update(G.custom_advanced_image("4", ["20", 1], ["30", 0]))
    graph.update(G.ksampler_image("5", hit))
    _ok(comfy_runner.run(graph))
    assert comfy_runner.node_outputs("20")[1].seeds[1] == hit, "the graph's query ranks as the fixture's"
    single, picked = comfy_runner.node_outputs("52")[0], comfy_runner.node_outputs("45")[0]
    assert picked.shape[0] == 1
    diff = float((picked[0] - single[0]).abs().max())
    assert diff < 1e-3, f"item 1 of the batch differs from KSampler's image of seed {hit} by {diff}"


# --------------------------------------------------------------------------------------------- conversions


def test_image_conversions_round_and_round_trip(comfy_nodes: ModuleType) -> None:
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    glue = G.pack_module(comfy_nodes, "nodes._glue")
    levels = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 1.0, 1.7, -0.2])
    image = levels.reshape(1, 1, 7, 1).repeat(2, 3, 1, 4)  # [B, H, W, 4]: an alpha channel is dropped
    arr = glue.to_uint8(image)
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 7, 3)
    assert arr[0, 0, :, 0].tolist() == [0, 0, 1, 255, 255, 255, 0], "rounded to the nearest level, clamped"
    pil = glue.to_pil(image)
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (7, 3)
    back = glue.to_image(pil)
    assert back.shape == (2, 3, 7, 3) and back.dtype == torch.float32
    assert float((back - image[..., :3].clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-7
    url = glue.data_url(torch.full((1, 1200, 600, 3), 0.5), max_side=512)
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (256, 512)
        assert abs(int(np.asarray(im)[100, 100, 0]) - 128) <= 2
