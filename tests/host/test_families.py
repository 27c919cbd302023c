"""SDXL, SD3 and Flux in a real ComfyUI: tiny random checkpoints load through the stock loaders and sample.

The models are made by tests/host/family_models.py. ComfyUI's CLIP-G and T5-XXL configs are fixed files (32 x 1280
and 24 x 4096 layers), far too big for a 2-core test machine, so the CLIP comes from the test-only node
NQTestTinyCLIPLoader: ComfyUI's own SDXL / SD3 / Flux text-encoder wrappers and real tokenizers (the tokenizer
files that ship with ComfyUI) with one-to-three-layer configs; widths and token rows are the real ones (T5 padded
to 8 rows instead of Flux's 256, for speed). Outputs are noise: these tests check plumbing, shapes and
reproducibility, not looks.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import comfy_harness
import family_models as FM
import nq_graphs as G
import pytest
import torch

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)


def _run_ok(runner: comfy_harness.InProcessRunner, graph: dict) -> dict:
    entry = runner.run(graph)
    assert "error" not in entry, f"graph refused: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"failed in {err['node_type']}: {err.get('exception_message')}"
    return entry


def test_stock_loader_detects_family(tiny_family: FM.TinyFamily, comfy_nodes: ModuleType) -> None:
    """comfy.sd.load_checkpoint_guess_config (what CheckpointLoaderSimple calls) detects the family's class and
    latent format; the checkpoint carries no text encoder (CLIP None)."""
    import comfy.latent_formats
    import comfy.sd
    import comfy.supported_models

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_family.path))
    expected = getattr(comfy.supported_models, tiny_family.spec.detected_as)
    assert type(model.model.model_config) is expected
    assert clip is None
    fmt = model.get_model_object("latent_format")
    assert fmt.latent_channels == tiny_family.spec.latent_channels
    assert vae.latent_channels == tiny_family.spec.latent_channels
    assert vae.downscale_ratio == tiny_family.spec.downscale
    if tiny_family.family == "flux":
        assert isinstance(fmt, comfy.latent_formats.Flux)
        dm = model.model.diffusion_model
        assert len(dm.double_blocks) == 1 and len(dm.single_blocks) == 1


def test_tiny_clip_conditioning_shapes(tiny_family: FM.TinyFamily, comfy_nodes: ModuleType) -> None:
    """The tiny CLIP gives the family's real conditioning widths and extras; the prompt matters."""
    clip = FM.tiny_clip(tiny_family.family)
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red fox in the snow"))
        other = clip.encode_from_tokens_scheduled(clip.tokenize("a blue car"))
    tensor, extras = cond[0]
    width, pooled = {"sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}[tiny_family.family]
    assert tensor.shape[0] == 1 and tensor.shape[2] == width
    assert tuple(extras["pooled_output"].shape) == (1, pooled)
    assert not torch.equal(tensor, other[0][0])
    assert torch.isfinite(tensor).all()


def test_tiny_clip_is_deterministic(comfy_nodes: ModuleType) -> None:
    """Every key is filled from one seeded generator: a fresh build (as in another process) encodes identically."""
    with torch.inference_mode():
        a = FM.tiny_clip("sdxl")
        b = FM.make_tiny_clip("sdxl")
        ca = a.encode_from_tokens_scheduled(a.tokenize("a red fox"))
        cb = b.encode_from_tokens_scheduled(b.tokenize("a red fox"))
    assert torch.equal(ca[0][0], cb[0][0])
    assert torch.equal(ca[0][1]["pooled_output"], cb[0][1]["pooled_output"])


@pytest.mark.parametrize("family", FM.FAMILIES)
def test_stock_ksampler_samples_each_family(family: str, tiny_family_factory, comfy_nodes: ModuleType,
                                            comfy_runner: comfy_harness.InProcessRunner) -> None:
    """CheckpointLoaderSimple + tiny CLIP + CLIPTextEncode (+ FluxGuidance) + KSampler + VAEDecode, in-process:
    finite, non-constant images and latents of the family's shape."""
    fam = tiny_family_factory(family)
    spec = fam.spec
    graph = FM.family_base(spec, fam.ckpt_name, positive="a red fox", negative="")
    tail = dict(steps=1, cfg=spec.cfg, sampler=spec.sampler, scheduler=spec.scheduler, size=spec.size,
                negative=FM.NEG)
    graph.update(G.ksampler_image("40", 7, **tail))
    _run_ok(comfy_runner, graph)
    latent = comfy_runner.node_outputs("401")[0]["samples"]
    image = comfy_runner.node_outputs("402")[0]
    assert tuple(latent.shape) == (1, spec.latent_channels, spec.size // spec.downscale, spec.size // spec.downscale)
    assert tuple(image.shape) == (1, spec.size, spec.size, 3)
    assert torch.isfinite(image).all()
    assert float(image.std()) > 0  # not a constant image


def test_family_checkpoints_are_in_the_session_folder(tiny_sdxl: FM.TinyFamily, tiny_checkpoint: Path) -> None:
    assert tiny_sdxl.path.parent == tiny_checkpoint.parent and tiny_sdxl.path.is_file()


# --------------------------------------------------------------------------------------------------
# Library, queries, NOISE / LATENT outputs and interpolation on every family
# --------------------------------------------------------------------------------------------------

FAMILY_KEY = {"sdxl": "SDXL:eps", "sd3": "SD3:flow", "flux": "Flux:flux"}
IMAGE_ATOL = 2.0 / 255.0


def _latent_hw(spec: FM.FamilySpec) -> tuple[int, int]:
    return spec.size // spec.downscale, spec.size // spec.downscale


def _common(spec: FM.FamilySpec) -> dict:
    return {"sampler": spec.sampler, "scheduler": spec.scheduler, "cfg": spec.cfg, "negative": FM.NEG,
            "size": spec.size}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().clamp(0, 1) - b.float().clamp(0, 1)).abs().max())


def test_build_query_and_walks_reproduce_ksampler(tiny_family: FM.TinyFamily, comfy_nodes: ModuleType,
                                                 comfy_runner: comfy_harness.InProcessRunner,
                                                 nq_libraries_dir: Path) -> None:
    """In-process, per family: BuildNoiseLibrary over seeds 0..1 in ONE batch equals stock KSampler at batch 1 for
    seed 1 (item 1: where naive batching differs); the library's key records the family and the model's latent
    shape (16 channels for SD3/Flux); a colour query's NOISE + LATENT through SamplerCustomAdvanced equal KSampler
    on the hit's seed; SeedSlerp with the model connected gives the model's latent shape and its t=0 item equals
    KSampler on seed A; ConditioningInterpolate keeps the family's extras and samples."""
    from noisequery_core import Library, verify

    spec = tiny_family.spec
    name = f"families/{spec.family}"
    common = _common(spec)
    graph = FM.family_base(spec, tiny_family.ckpt_name, positive="", negative="")
    graph["10"] = G.build(name, seed_start=0, count=2, batch_size=2, steps=1, thumbnail_size=64, **common)
    graph.update(G.ksampler_image("30", 1, steps=1, **common))
    _run_ok(comfy_runner, graph)

    lib = Library.open(nq_libraries_dir / "families" / spec.family)
    h, w = _latent_hw(spec)
    assert lib.generation.latent_shape == (spec.latent_channels, h, w)
    assert lib.generation.family == FAMILY_KEY[spec.family]
    assert sorted(int(s) for s in lib.seeds) == [0, 1]
    assert verify(lib.path).ok
    report = comfy_runner.node_outputs("10")[2]
    assert f"family={FAMILY_KEY[spec.family]}" in report, report
    ks_latent = comfy_runner.node_outputs("301")[0]["samples"]
    assert tuple(ks_latent.shape) == (1, spec.latent_channels, h, w)
    ks = comfy_runner.node_outputs("302")[0]
    batch = comfy_runner.node_outputs("10")[1]
    assert batch.shape[0] == 2
    assert _max_diff(ks[0], batch[1]) <= IMAGE_ATOL

    # Query -> NOISE + LATENT -> SamplerCustomAdvanced == KSampler(seed of the hit)
    q = {"50": G.color_query(name, top_k=1), "51": G.preview_thumbnails("50")}
    q.update(FM.family_base(spec, tiny_family.ckpt_name, positive="", negative=""))
    q.update(G.custom_advanced_image("6", ["50", 1], ["50", 2], steps=1, cfg=spec.cfg, sampler=spec.sampler,
                                     scheduler=spec.scheduler, negative=FM.NEG))
    q.update(G.ksampler_image("31", ["50", 0], steps=1, **common))
    _run_ok(comfy_runner, q)
    latent = comfy_runner.node_outputs("50")[2]["samples"]
    assert tuple(latent.shape) == (1, spec.latent_channels, h, w)
    noise = comfy_runner.node_outputs("50")[1].generate_noise({"samples": latent})
    assert tuple(noise.shape) == (1, spec.latent_channels, h, w)
    assert _max_diff(comfy_runner.node_outputs("65")[0], comfy_runner.node_outputs("312")[0]) <= IMAGE_ATOL

    # Seed walk with the model connected: the model's latent; t=0 is seed A.
    s = FM.family_base(spec, tiny_family.ckpt_name, positive="", negative="")
    s["70"] = {"class_type": "NoiseQuerySeedSlerp", "inputs": {
        "seed_a": 5, "seed_b": 9, "steps": 2, "t_start": 0.0, "t_end": 0.5, "width": spec.size,
        "height": spec.size, "model": [FM.CKPT, 0]}}
    s["71"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["70", 1], "batch_index": 0, "length": 1}}
    s.update(G.custom_advanced_image("8", ["70", 0], ["71", 0], steps=1, cfg=spec.cfg, sampler=spec.sampler,
                                     scheduler=spec.scheduler, negative=FM.NEG))
    s.update(G.ksampler_image("32", 5, steps=1, **common))
    _run_ok(comfy_runner, s)
    assert tuple(comfy_runner.node_outputs("70")[1]["samples"].shape) == (2, spec.latent_channels, h, w)
    assert _max_diff(comfy_runner.node_outputs("85")[0], comfy_runner.node_outputs("322")[0]) <= IMAGE_ATOL


GRID_CORNERS = (5, 6, 7, 9)  # top-left, top-right, bottom-left, bottom-right


def _grid_graph(spec: FM.FamilySpec, ckpt_name: str) -> dict:
    """NoiseQuerySeedGrid "75" (2 x 3 cells, the model connected), its bottom-right cell (item 5) through
    SamplerCustomAdvanced (image node "95", preview "96") and KSampler on the bottom-right seed (preview "343")."""
    g = FM.family_base(spec, ckpt_name, positive="", negative="")
    tl, tr, bl, br = GRID_CORNERS
    g["75"] = {"class_type": "NoiseQuerySeedGrid", "inputs": {
        "seed_top_left": tl, "seed_top_right": tr, "seed_bottom_left": bl, "seed_bottom_right": br, "rows": 2,
        "columns": 3, "width": spec.size, "height": spec.size, "model": [FM.CKPT, 0]}}
    g["76"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["75", 1], "batch_index": 5, "length": 1}}
    g.update(G.custom_advanced_image("9", ["75", 0], ["76", 0], steps=1, cfg=spec.cfg, sampler=spec.sampler,
                                     scheduler=spec.scheduler, negative=FM.NEG))
    g.update(G.ksampler_image("34", br, steps=1, **_common(spec)))
    return g


def test_seed_grid_with_model_gives_family_latent_and_corner_matches_ksampler(
        tiny_family: FM.TinyFamily, comfy_nodes: ModuleType, comfy_runner: comfy_harness.InProcessRunner) -> None:
    """In-process, per family: NoiseQuerySeedGrid with the model connected gives a LATENT and NOISE of the model's
    shape (16 channels on SD3/Flux, not the default 4); each corner cell's noise is exactly KSampler's noise for
    that corner's seed; the bottom-right cell (LatentFromBatch index 5) through SamplerCustomAdvanced renders what
    stock KSampler renders for that seed."""
    import comfy.sample

    spec = tiny_family.spec
    h, w = _latent_hw(spec)
    _run_ok(comfy_runner, _grid_graph(spec, tiny_family.ckpt_name))
    noise, latent, report = comfy_runner.node_outputs("75")
    assert tuple(latent["samples"].shape) == (6, spec.latent_channels, h, w)
    got = noise.generate_noise(latent)
    assert tuple(got.shape) == (6, spec.latent_channels, h, w)
    for item, seed in zip((0, 2, 3, 5), GRID_CORNERS, strict=True):
        want = comfy.sample.prepare_noise(torch.zeros(1, spec.latent_channels, h, w), seed)[0]
        assert torch.equal(got[item], want), (item, seed)
    assert not torch.equal(got[1], got[0]) and "2 x 3" in report
    ks_latent = comfy_runner.node_outputs("341")[0]["samples"]
    assert tuple(comfy_runner.node_outputs("94")[0]["samples"].shape) == tuple(ks_latent.shape)
    assert _max_diff(comfy_runner.node_outputs("95")[0], comfy_runner.node_outputs("342")[0]) <= IMAGE_ATOL


def test_conditioning_interpolation_keeps_family_extras(tiny_family: FM.TinyFamily, comfy_nodes: ModuleType,
                                                        comfy_runner: comfy_harness.InProcessRunner) -> None:
    """NoiseQueryConditioningInterpolate on the family's conditioning: t=0 is A exactly (tokens and pooled output),
    a 2-step batch blends the pooled output too, Flux guidance survives, and KSampler samples the batch."""
    spec = tiny_family.spec
    g = FM.family_base(spec, tiny_family.ckpt_name, positive="a red fox", negative="a blue car")
    g["90"] = {"class_type": "NoiseQueryConditioningInterpolate", "inputs": {
        "conditioning_a": [FM.POS, 0], "conditioning_b": [FM.NEG, 0], "mode": "slerp", "t_start": 0.0,
        "t_end": 1.0, "steps": 2}}
    g["91"] = {"class_type": "EmptyLatentImage", "inputs": {"width": spec.size, "height": spec.size, "batch_size": 2}}
    g["92"] = {"class_type": "KSampler", "inputs": {
        "model": [FM.CKPT, 0], "seed": 3, "steps": 1, "cfg": spec.cfg, "sampler_name": spec.sampler,
        "scheduler": spec.scheduler, "positive": ["90", 0], "negative": [FM.NEG, 0], "latent_image": ["91", 0],
        "denoise": 1.0}}
    g["93"] = {"class_type": "VAEDecode", "inputs": {"samples": ["92", 0], "vae": [FM.CKPT, 2]}}
    g["94"] = {"class_type": "PreviewImage", "inputs": {"images": ["93", 0]}}
    _run_ok(comfy_runner, g)
    a = comfy_runner.node_outputs(FM.POS)[0]
    out = comfy_runner.node_outputs("90")[0]
    tokens, extras = out[0]
    assert tokens.shape[0] == 2 and tokens.shape[2] == a[0][0].shape[2]
    n = a[0][0].shape[1]
    assert torch.allclose(tokens[0, :n], a[0][0][0], atol=1e-5)
    pooled = extras["pooled_output"]
    assert tuple(pooled.shape) == (2, a[0][1]["pooled_output"].shape[-1])
    assert torch.allclose(pooled[0], a[0][1]["pooled_output"][0], atol=1e-5)
    assert not torch.allclose(pooled[1], pooled[0])
    if spec.flux_guidance is not None:
        assert extras["guidance"] == spec.flux_guidance
    samples = comfy_runner.node_outputs("92")[0]["samples"]
    assert samples.shape[:2] == (2, spec.latent_channels) and torch.isfinite(samples).all()


# --------------------------------------------------------------------------------------------------
# Through POST /prompt (headless server)
# --------------------------------------------------------------------------------------------------

def _server_image(server: comfy_harness.ComfyServer, entry: dict, node: str) -> list:
    import io as _io

    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(_io.BytesIO(server.get_image(**img))).convert("RGB"), dtype=np.int16)
            for img in comfy_harness.output_images(entry, node)]


def _server_ok(entry: dict) -> dict:
    err = comfy_harness.execution_error(entry)
    assert err is None, f"failed in {err['node_type']}: {err.get('exception_message')}"
    return entry


def test_server_build_query_reproduce(tiny_family: FM.TinyFamily, comfy_server: comfy_harness.ComfyServer,
                                      server_libraries_dir: Path) -> None:
    """POST /prompt per family: BuildNoiseLibrary (seeds 0..1, one batch) next to KSampler on seed 1 -> the same
    PNG (within 2 levels); then a colour query on that library whose NOISE + LATENT through SamplerCustomAdvanced
    give the same image as KSampler on the query's seed output."""
    from noisequery_core import Library

    spec = tiny_family.spec
    name = f"families/{spec.family}"
    common = _common(spec)
    graph = FM.family_base(spec, tiny_family.ckpt_name)
    graph["10"] = G.build(name, seed_start=0, count=2, batch_size=2, steps=1, thumbnail_size=64, **common)
    graph.update(G.ksampler_image("30", 1, steps=1, **common))
    entry = _server_ok(comfy_server.run(graph, timeout=900))
    built = _server_image(comfy_server, entry, "10")
    ks = _server_image(comfy_server, entry, "303")
    assert len(built) == 2 and len(ks) == 1
    assert int(abs(built[1] - ks[0]).max()) <= 2
    lib = Library.open(server_libraries_dir / "families" / spec.family)
    assert lib.generation.family == FAMILY_KEY[spec.family]
    assert lib.generation.latent_shape == (spec.latent_channels, *_latent_hw(spec))

    q = FM.family_base(spec, tiny_family.ckpt_name)
    q["50"] = G.color_query(name, top_k=1)
    q["51"] = G.preview_thumbnails("50")
    q.update(G.custom_advanced_image("6", ["50", 1], ["50", 2], steps=1, cfg=spec.cfg, sampler=spec.sampler,
                                     scheduler=spec.scheduler, negative=FM.NEG))
    q.update(G.ksampler_image("31", ["50", 0], steps=1, **common))
    entry = _server_ok(comfy_server.run(q, timeout=900))
    custom = _server_image(comfy_server, entry, "66")
    ks = _server_image(comfy_server, entry, "313")
    assert len(custom) == 1 and len(ks) == 1
    assert custom[0].shape == (spec.size, spec.size, 3)
    assert int(abs(custom[0] - ks[0]).max()) <= 2



def test_server_seed_grid_corner_on_sd3(tiny_sd3: FM.TinyFamily, comfy_server: comfy_harness.ComfyServer) -> None:
    """POST /prompt on SD3: the seed grid with the model connected, its bottom-right cell through
    SamplerCustomAdvanced -> the same PNG (within 2 levels) as KSampler on the bottom-right seed."""
    spec = tiny_sd3.spec
    entry = _server_ok(comfy_server.run(_grid_graph(spec, tiny_sd3.ckpt_name), timeout=900))
    custom = _server_image(comfy_server, entry, "96")
    ks = _server_image(comfy_server, entry, "343")
    assert len(custom) == 1 and len(ks) == 1
    assert custom[0].shape == (spec.size, spec.size, 3)
    assert int(abs(custom[0] - ks[0]).max()) <= 2

# --------------------------------------------------------------------------------------------------
# Seed influence check
# --------------------------------------------------------------------------------------------------

def test_seed_influence_node(tiny_family: FM.TinyFamily, comfy_nodes: ModuleType,
                             comfy_runner: comfy_harness.InProcessRunner) -> None:
    """NoiseQuerySeedInfluence runs on each family (2 prompts x 2 seeds, 1 step): shares in 0..1, the report names
    the family and says what it means for a library, and each render equals KSampler for that prompt and seed."""
    spec = tiny_family.spec
    g = FM.family_base(spec, tiny_family.ckpt_name, positive="a red fox", negative="")
    g["60"] = {"class_type": "NoiseQuerySeedInfluence", "inputs": {
        "model": [FM.CKPT, 0], "vae": [FM.CKPT, 2], "clip": [FM.CLIP, 0], "prompts": "a red fox\na blue car",
        "negative_prompt": "", "seed_start": 4, "seeds": 2, "width": spec.size, "height": spec.size, "steps": 1,
        "cfg": spec.cfg, "sampler_name": spec.sampler, "scheduler": spec.scheduler,
        "guidance": spec.flux_guidance or 3.5}}
    g.update(G.ksampler_image("33", 5, steps=1, **_common(spec)))  # prompt "a red fox", seed 5 = render 1
    _run_ok(comfy_runner, g)
    report, layout, colour, renders = comfy_runner.node_outputs("60")
    assert 0.0 <= layout <= 1.0 and 0.0 <= colour <= 1.0
    assert FAMILY_KEY[spec.family] in report and "2 prompts x 2 seeds" in report
    assert "library" in report.splitlines()[4]
    assert tuple(renders.shape) == (4, spec.size, spec.size, 3)
    assert _max_diff(renders[1], comfy_runner.node_outputs("332")[0][0]) <= IMAGE_ATOL


def test_seed_influence_refuses_one_prompt(tiny_sd3: FM.TinyFamily, comfy_nodes: ModuleType,
                                           comfy_runner: comfy_harness.InProcessRunner) -> None:
    spec = tiny_sd3.spec
    g = FM.family_base(spec, tiny_sd3.ckpt_name)
    g["60"] = {"class_type": "NoiseQuerySeedInfluence", "inputs": {
        "model": [FM.CKPT, 0], "vae": [FM.CKPT, 2], "clip": [FM.CLIP, 0], "prompts": "only one\n\n",
        "negative_prompt": "", "seed_start": 0, "seeds": 2, "width": 64, "height": 64, "steps": 1, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "simple", "guidance": 3.5}}
    entry = comfy_runner.run(g)
    err = comfy_harness.execution_error(entry)
    assert err is not None and "2 to 16" in err.get("exception_message", ""), err


def test_sd15_family_key_and_influence(tiny_ckpt_name: str, comfy_nodes: ModuleType,
                                       comfy_runner: comfy_harness.InProcessRunner, nq_libraries_dir: Path) -> None:
    """SD1.5 (the session's tiny SD1.5 checkpoint with its own CLIP): the key records SD15:eps and a 4-channel
    latent, and the seed influence check runs with the checkpoint's CLIP."""
    from noisequery_core import Library

    g = G.base(tiny_ckpt_name)
    g["10"] = G.build("families/sd15", seed_start=0, count=1, batch_size=1, steps=1, thumbnail_size=0)
    g["60"] = {"class_type": "NoiseQuerySeedInfluence", "inputs": {
        "model": [G.CKPT, 0], "vae": [G.CKPT, 2], "clip": [G.CKPT, 1], "prompts": "a red fox\na blue car",
        "negative_prompt": "", "seed_start": 0, "seeds": 2, "width": 64, "height": 64, "steps": 1, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "normal", "guidance": 3.5}}
    _run_ok(comfy_runner, g)
    lib = Library.open(nq_libraries_dir / "families" / "sd15")
    assert lib.generation.family == "SD15:eps" and lib.generation.latent_shape == (4, 8, 8)
    report, layout, _, renders = comfy_runner.node_outputs("60")
    assert "SD15:eps" in report and 0.0 <= layout <= 1.0 and tuple(renders.shape) == (4, 64, 64, 3)
