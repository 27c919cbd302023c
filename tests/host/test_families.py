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
