"""NoiseCLR on SDXL, SD3 and Flux in a real ComfyUI (tiny random checkpoints of tests/host/family_models.py).

Per family, through ComfyUI's executor: training with the stock checkpoint loader's MODEL/VAE and the tiny CLIP
(ComfyUI's real SDXL / SD3 / Flux text-encoder wrappers with one-to-three layers; the checkpoints carry no text
encoder) moves both parts of each direction (the conditioning tokens and the pooled vector) and leaves the model's
weights bit-identical; the file records the family and the pooled part; applying with KSampler changes the sample,
and scale 0 is bit-identical to the unpatched model. Also: directions of one family are refused on another (the
message names both), an interrupted SD3 run resumes to the uninterrupted result, the Flux training forward (plain
RoPE, functionalized in-place residuals) computes what ComfyUI's own forward does, and on every family a train + apply
graph runs through POST /prompt.

The models are random, so the images are noise: these tests check the mechanics, not what a direction means.
Sizes are tiny on purpose (64x64 images, 2 iterations, 8 tokens per direction): the machine has 2 shared cores,
and the "tiny" SDXL keeps the real block layout (10 transformer blocks per deep level) that detection needs.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import family_models as FM
import nq_graphs as G
import nq_training as T
import pytest
import torch
from comfy_harness import ComfyServer, InProcessRunner
from test_noiseclr_nodes import apply_node, train_node, write_domain

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

DOMAIN = "nq_noiseclr_family_domain"
ITERS = 2
TOKENS = 8
# (token width, pooled width) of each family's conditioning
WIDTHS = {"sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}
LABELS = {"sd": "SD1.x/SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "Flux.1"}


def _train(name: str, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(iterations=ITERS, num_directions=3, directions_per_iteration=2, batch_size=2,
                                    token_count=TOKENS, checkpoint_every=1, clip=[FM.CLIP, 0], folder=DOMAIN)
    settings.update(overrides)
    return train_node(name, **settings)


@pytest.fixture(scope="module")
def domain(comfy_nodes: ModuleType) -> str:
    import folder_paths

    write_domain(Path(folder_paths.get_input_directory()) / DOMAIN, count=4)
    return DOMAIN


@pytest.fixture(scope="module", params=FM.FAMILIES)
def trained(request: pytest.FixtureRequest, tiny_family_factory: Any, comfy_runner: InProcessRunner,
            comfy_nodes: ModuleType, domain: str, nq_noiseclr_dir: Path) -> dict[str, Any]:
    """Per family: iterations=0 (the initial directions; loads the model), a snapshot of the diffusion model's
    weights, then the real run."""
    fam: FM.TinyFamily = tiny_family_factory(request.param)
    graph = FM.family_base(fam.spec, fam.ckpt_name)
    graph["10"] = _train(f"fam/{fam.family}_zero", iterations=0)
    T.ok(comfy_runner.run(graph))
    model = comfy_runner.node_outputs(FM.CKPT)[0]
    before = T.weights(model)
    graph["10"] = _train(f"fam/{fam.family}")
    T.ok(comfy_runner.run(graph))
    assert comfy_runner.node_outputs(FM.CKPT)[0] is model, "the checkpoint loader should have been served from cache"
    core = T.noiseclr_core(comfy_nodes)
    return {"fam": fam, "model": model, "changed": T.changed_weights(before, model),
            "report": comfy_runner.node_outputs("10")[2],
            "init": core.load_directions(nq_noiseclr_dir / f"fam/{fam.family}_zero.safetensors"),
            "final": core.load_directions(nq_noiseclr_dir / f"fam/{fam.family}.safetensors")}


def test_training_moves_tokens_and_pooled_part_and_leaves_the_model_alone(trained: dict[str, Any]) -> None:
    fam, init, final = trained["fam"], trained["init"], trained["final"]
    width, pooled = WIDTHS[fam.family]
    assert final.family == fam.family and final.iterations_done == ITERS and len(final.loss_history) == ITERS
    assert final.directions.shape == (3, TOKENS, width) and final.pooled.shape == (3, pooled)
    # ∅ is the tiny CLIP's empty prompt, tokens and pooled vector
    clip = FM.tiny_clip(fam.family)
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert torch.equal(final.empty, cond[0][0][0].float())
    assert torch.equal(final.empty_pooled, cond[0][1]["pooled_output"][0].float())
    # both parts of every direction sampled in the two iterations moved away from their start
    assert torch.equal(init.empty, final.empty) and torch.equal(init.empty_pooled, final.empty_pooled)
    moved_tokens = (final.directions - init.directions).flatten(1).abs().amax(1)
    moved_pooled = (final.pooled - init.pooled).abs().amax(1)
    assert int((moved_tokens > 0).sum()) >= 2 and int((moved_pooled > 0).sum()) >= 2, (moved_tokens, moved_pooled)
    assert torch.equal(moved_tokens > 0, moved_pooled > 0), "a direction is trained as a whole"
    # the frozen model: every tensor bit-identical after training
    assert not trained["changed"], f"training changed the model: {trained['changed'][:5]}"
    assert f"+ a pooled part of {pooled} ({LABELS[fam.family]})" in trained["report"]
    if fam.family == "flux":
        assert final.base_model["guidance"] == 3.5  # what Flux-dev was conditioned on while training


def _sample(runner: InProcessRunner, fam: FM.TinyFamily, directions: str | None,
            slots: list[tuple[int, float, float, float]]) -> torch.Tensor:
    """KSampler latent (prompt 'a red fox', one step at cfg 1: the cheapest sampling that runs the directions; Flux
    through FluxGuidance), with the model from NoiseCLRApplyDirections when directions is set."""
    spec = fam.spec
    graph = FM.family_base(spec, fam.ckpt_name, positive="a red fox", negative="")
    model = [FM.CKPT, 0]
    if directions is not None:
        graph["30"] = apply_node(directions, slots)
        model = ["30", 0]
    graph.update(G.ksampler_image("4", 5, steps=1, cfg=1.0, sampler=spec.sampler, scheduler=spec.scheduler,
                                  negative=FM.NEG, model=model, size=64))
    T.ok(runner.run(graph))
    return runner.node_outputs("41")[0]["samples"].clone()


def test_apply_changes_the_sample_and_scale_zero_is_bit_identical(trained: dict[str, Any],
                                                                  comfy_runner: InProcessRunner) -> None:
    fam = trained["fam"]
    name = f"fam/{fam.family}.safetensors"
    plain = _sample(comfy_runner, fam, None, [])
    assert torch.equal(_sample(comfy_runner, fam, name, [(0, 0.0, 0.0, 1.0), (1, 0.0, 0.0, 1.0)]), plain)
    edited = _sample(comfy_runner, fam, name, [(0, 1.5, 0.0, 1.0), (1, -1.0, 0.0, 1.0)])
    assert torch.isfinite(edited).all() and float((edited - plain).abs().max()) > 0
    report = comfy_runner.node_outputs("30")[2]
    assert f"+ pooled {WIDTHS[fam.family][1]}" in report and LABELS[fam.family] in report


def test_the_pooled_part_reaches_the_model(trained: dict[str, Any], comfy_runner: InProcessRunner,
                                          comfy_nodes: ModuleType, nq_noiseclr_dir: Path) -> None:
    """The same tokens with the pooled part set back to ∅'s sample differently: the pooled part is applied."""
    fam, final = trained["fam"], trained["final"]
    core = T.noiseclr_core(comfy_nodes)
    flat = core.Directions(directions=final.directions, empty=final.empty, empty_pooled=final.empty_pooled,
                           pooled=final.empty_pooled.unsqueeze(0).repeat(final.count, 1).clone(), family=fam.family,
                           base_model=final.base_model)
    core.save_directions(nq_noiseclr_dir / f"fam/{fam.family}_no_pooled_edit.safetensors", flat)
    slots = [(0, 1.5, 0.0, 1.0)]
    with_pooled = _sample(comfy_runner, fam, f"fam/{fam.family}.safetensors", slots)
    tokens_only = _sample(comfy_runner, fam, f"fam/{fam.family}_no_pooled_edit.safetensors", slots)
    assert float((with_pooled - tokens_only).abs().max()) > 0


def test_directions_of_another_family_are_refused(trained: dict[str, Any], comfy_runner: InProcessRunner,
                                                   comfy_nodes: ModuleType, nq_noiseclr_dir: Path) -> None:
    fam, final = trained["fam"], trained["final"]
    core = T.noiseclr_core(comfy_nodes)
    # another family's file (the next family in the list), and an SD1.5 file from before families (format 1)
    other = FM.FAMILIES[(FM.FAMILIES.index(fam.family) + 1) % len(FM.FAMILIES)]
    core.save_directions(nq_noiseclr_dir / f"fam/as_{other}.safetensors",
                         core.Directions(directions=final.directions, empty=final.empty, pooled=final.pooled,
                                         empty_pooled=final.empty_pooled, family=other,
                                         base_model={"model_class": "Other"}))
    graph = FM.family_base(fam.spec, fam.ckpt_name)
    graph["30"] = apply_node(f"fam/as_{other}.safetensors", [(0, 1.0, 0.0, 1.0)], model=[FM.CKPT, 0])
    graph.update(G.ksampler_image("4", 5, steps=1, model=["30", 0], negative=FM.NEG, size=64))
    msg = T.run_error(comfy_runner.run(graph))
    assert f"trained on the {LABELS[other]} ('{other}') family" in msg
    assert f"the connected model is {LABELS[fam.family]} ('{fam.family}'" in msg and "Train" in msg


def test_legacy_sd_files_are_refused_on_other_families(tiny_sd3: FM.TinyFamily, comfy_runner: InProcessRunner,
                                                       nq_noiseclr_dir: Path) -> None:
    """A version-1 file (written before families; SD1.x/SD2.x was all NoiseCLR trained) reads as family 'sd'."""
    import json

    from safetensors.torch import save_file

    meta = {"format": "noisequery.noiseclr", "format_version": 1, "names": ["a", "b"], "settings": {},
            "base_model": {"model_class": "SD15", "context_dim": 768}}
    save_file({"directions": torch.zeros(2, 77, 768), "empty": torch.zeros(77, 768)},
              str(nq_noiseclr_dir / "fam/legacy_sd15.safetensors"), metadata={"noiseclr": json.dumps(meta)})
    graph = FM.family_base(tiny_sd3.spec, tiny_sd3.ckpt_name)
    graph["30"] = apply_node("fam/legacy_sd15.safetensors", [(0, 1.0, 0.0, 1.0)], model=[FM.CKPT, 0])
    graph.update(G.ksampler_image("4", 5, steps=1, model=["30", 0], negative=FM.NEG, size=64))
    msg = T.run_error(comfy_runner.run(graph))
    assert "trained on the SD1.x/SD2.x ('sd') family (SD15)" in msg and "SD3/SD3.5 ('sd3'" in msg


def test_interrupted_sd3_training_resumes_to_the_uninterrupted_result(
        tiny_sd3: FM.TinyFamily, comfy_runner: InProcessRunner, comfy_nodes: ModuleType, domain: str,
        nq_noiseclr_dir: Path) -> None:
    core, mod = T.noiseclr_core(comfy_nodes), T.noiseclr_runtime(comfy_nodes)
    graph = FM.family_base(tiny_sd3.spec, tiny_sd3.ckpt_name)
    graph["10"] = _train("fam/sd3_full", iterations=3, checkpoint_every=5)
    T.ok(comfy_runner.run(graph))
    full = core.load_directions(nq_noiseclr_dir / "fam/sd3_full.safetensors")

    with T.interrupt_at_check(mod, 3):  # before iteration 2
        graph["10"] = _train("fam/sd3_cut", iterations=3, checkpoint_every=5)
        entry = comfy_runner.run(graph)
    assert comfy_harness.execution_error(entry)["event"] == "execution_interrupted"
    saved = core.load_directions(nq_noiseclr_dir / "fam/sd3_cut.safetensors.checkpoint")
    assert saved.iterations_done == 2 and saved.pooled is not None

    T.ok(comfy_runner.run(graph))  # re-queued: resumes at 2
    cut = core.load_directions(nq_noiseclr_dir / "fam/sd3_cut.safetensors")
    assert torch.equal(cut.directions, full.directions) and torch.equal(cut.pooled, full.pooled)
    assert cut.loss_history == full.loss_history


def test_flux_training_forward_matches_comfyui_forward(tiny_flux: FM.TinyFamily, comfy_nodes: ModuleType) -> None:
    """The training forward swaps Flux's fused RoPE op for plain ops and functionalizes the in-place residual adds
    (both needed for a gradient); it must compute what sampling computes, and put the fused op back."""
    import comfy.ldm.flux.math as flux_math
    import comfy.sd

    mod = T.noiseclr_runtime(comfy_nodes)
    fused = flux_math.apply_rope
    # the rotation alone, against ComfyUI's op on Flux-shaped inputs
    pe = flux_math.rope(torch.arange(12, dtype=torch.float32).view(1, 12), 128, 10000).unsqueeze(1)
    q, k = torch.randn(2, 1, 12, 128), torch.randn(2, 1, 12, 128)
    training = G.pack_module(comfy_nodes, "nodes._training")
    for got, want in zip(training._rope_pair(q, k, pe), fused(q, k, pe), strict=True):
        assert torch.allclose(got, want, atol=1e-5)

    model = comfy.sd.load_checkpoint_guess_config(str(tiny_flux.path))[0]  # a fresh copy: the test patches nothing
    g = torch.Generator().manual_seed(2)
    x, ctx, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 8, 4096, generator=g), torch.randn(2, 768, generator=g)
    sigma = torch.tensor([0.7, 0.4])
    with torch.inference_mode(False), torch.enable_grad():
        predict, _ = mod.make_predict_noise(model, guidance=3.5)
        ctx_g = ctx.clone().requires_grad_(True)
        eps = predict(x, sigma, ctx_g, pooled)
        (grad,) = torch.autograd.grad(eps.square().sum(), ctx_g)
    assert flux_math.apply_rope is fused, "the fused RoPE op was not put back"
    assert float(grad.abs().max()) > 0
    with torch.inference_mode():
        den = model.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled, guidance=torch.full((2,), 3.5))
        want = (x - den) / sigma.view(-1, 1, 1, 1)
    assert torch.allclose(eps.detach(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("family", FM.FAMILIES)
def test_post_prompt_trains_and_applies(family: str, comfy_server: ComfyServer, tiny_family_factory: Any,
                                        tiny_ckpt_name: str, server_noiseclr_dir: Path) -> None:
    """Per family through POST /prompt: train (2 iterations, 64x64) writes the directions file, applying it samples
    and decodes, and an SD1.5 model refuses those directions, naming both families."""
    fam: FM.TinyFamily = tiny_family_factory(family)
    spec = fam.spec
    assert comfy_server.workdir is not None
    write_domain(comfy_server.workdir / "input" / DOMAIN, count=4)
    graph = FM.family_base(spec, fam.ckpt_name, positive="a red fox", negative="")
    graph["10"] = _train(f"server/{family}")
    T.ok(comfy_server.run(graph, timeout=300))
    assert (server_noiseclr_dir / "server" / f"{family}.safetensors").is_file()
    graph = FM.family_base(spec, fam.ckpt_name, positive="a red fox", negative="")
    graph["30"] = apply_node(f"server/{family}.safetensors", [(0, 1.0, 0.0, 1.0)], model=[FM.CKPT, 0])
    graph.update(G.ksampler_image("4", 5, steps=1, cfg=spec.cfg, sampler=spec.sampler, scheduler=spec.scheduler,
                                  negative=FM.NEG, model=["30", 0], size=64))
    entry = T.ok(comfy_server.run(graph, timeout=300))
    assert comfy_harness.output_images(entry)
    # an SD1.5 model refuses these directions through the server too, naming both families
    graph[FM.CKPT]["inputs"]["ckpt_name"] = tiny_ckpt_name
    entry = comfy_server.run(graph, timeout=300)
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["node_type"] == "NoiseCLRApplyDirections"
    assert f"{LABELS[family]} ('{family}') family" in err["exception_message"]
    assert "SD1.x/SD2.x ('sd', SD15)" in err["exception_message"]
