"""The seed-invariant prompt on SDXL, SD3 and Flux in a real ComfyUI (tiny random checkpoints of family_models.py).

Per family, through ComfyUI's executor: the optimisation tunes the prompt's tokens and its pooled vector with the
model's own training target (eps for SDXL, flow for SD3 and Flux), lowers the liked image's denoising loss on
held-out seeds, leaves the diffusion model's weights bit-identical, records the family (and Flux's guidance) in the
file; its CONDITIONING and the Load node's carry the tuned pooled vector and the prompt's options and sample in a
stock KSampler. Also: a file of another family (or an SD1.5 file from before families) is refused naming both
families, an interrupted SD3 run resumes to the uninterrupted result, and the SD3 graph runs through POST /prompt
(SD3 as the cheapest pooled family: the tiny SDXL keeps SDXL's ten transformer blocks per deep level).

The models are random, so the images are noise: these tests check the mechanics. Sizes are tiny on purpose (64x64
liked image, 3 iterations of 2 noises): the machine has 2 shared cores.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import family_models as FM
import nq_graphs as G
import nq_training as T
import pytest
import torch
from comfy_harness import InProcessRunner
from test_invariant_nodes import invariant_node as sd_invariant_node

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

PROMPT = "a red barn in a green field"
LIKED_SEED = 5
ITERS = 3
NODE = "10"
# (token width, pooled width) of each family's conditioning
WIDTHS = {"sdxl": (2048, 1280), "sd3": (4096, 2048), "flux": (4096, 768)}
LABELS = {"sd": "SD1.x/SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "Flux.1"}


def invariant_node(name: str, *, iterations: int = ITERS, **overrides: Any) -> dict[str, Any]:
    """The SD1.5 tests' node (same node ids: family_base keeps "1" and "2"), checkpointing every 2 iterations."""
    return sd_invariant_node(name, iterations=iterations, **{"checkpoint_every": 2, **overrides})


def graph(fam: FM.TinyFamily, node: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoint "1", tiny CLIP "1c", prompt "2" (through FluxGuidance on Flux), the liked image "42" (a one-step
    KSampler render of LIKED_SEED) and the node under test as NODE."""
    spec = fam.spec
    g = FM.family_base(spec, fam.ckpt_name, positive=PROMPT)
    g.update(G.ksampler_image("4", LIKED_SEED, steps=1, cfg=1.0, sampler=spec.sampler, scheduler=spec.scheduler,
                              negative=FM.NEG, size=spec.size, output=node is None))
    if node is not None:
        g[NODE] = node
    return g


def sample_with(conditioning: list[Any], fam: FM.TinyFamily) -> dict[str, Any]:
    """A stock KSampler (one step, cfg 1) whose positive is ``conditioning`` (a node output), decoded and previewed."""
    spec = fam.spec
    tail = G.ksampler_image("5", 7, steps=1, cfg=1.0, sampler=spec.sampler, scheduler=spec.scheduler,
                            negative=FM.NEG, size=spec.size)
    tail["51"]["inputs"]["positive"] = conditioning
    return tail


def loader_node(name: str) -> dict[str, Any]:
    return {"class_type": "NoiseQueryLoadInvariantPrompt", "inputs": {"model": [FM.CKPT, 0], "embedding": name}}


@pytest.fixture(scope="module", params=FM.FAMILIES)
def tuned(request: pytest.FixtureRequest, tiny_family_factory: Any, comfy_runner: InProcessRunner,
          comfy_nodes: ModuleType, nq_embeddings_dir: Path) -> dict[str, Any]:
    """Per family: render the liked image (loads the model), snapshot the diffusion model, then tune 'fam/<family>'
    and sample its CONDITIONING in a stock KSampler in the same graph."""
    import time

    fam: FM.TinyFamily = tiny_family_factory(request.param)
    T.ok(comfy_runner.run(graph(fam)))
    model = comfy_runner.node_outputs(FM.CKPT)[0]
    before = T.weights(model)
    g = graph(fam, invariant_node(f"fam/{fam.family}"))
    g.update(sample_with([NODE, 0], fam))
    start = time.monotonic()
    entry = T.ok(comfy_runner.run(g))
    seconds = time.monotonic() - start
    assert comfy_runner.node_outputs(FM.CKPT)[0] is model, "the checkpoint loader should have been served from cache"
    return {"fam": fam, "model": model, "changed": T.changed_weights(before, model), "entry": entry,
            "outs": comfy_runner.node_outputs(NODE), "cond": comfy_runner.node_outputs(FM.POS)[0],
            "liked": comfy_runner.node_outputs("42")[0], "vae": comfy_runner.node_outputs(FM.CKPT)[2],
            "sampled": comfy_runner.node_outputs("51")[0]["samples"].clone(), "seconds": seconds,
            "path": nq_embeddings_dir / "fam" / f"{fam.family}.safetensors"}


def test_tuning_lowers_held_out_loss_and_leaves_the_model_alone(tuned: dict[str, Any],
                                                               comfy_nodes: ModuleType) -> None:
    fam = tuned["fam"]
    core, mod = T.invariant_core(comfy_nodes), T.invariant_nodes(comfy_nodes)
    width, pooled = WIDTHS[fam.family]
    e = core.load_embedding(tuned["path"])
    assert e.family == fam.family and e.iterations_done == ITERS and len(e.loss_history) == ITERS
    assert e.tokens.shape[1] == width and e.pooled.shape == (pooled,) and e.original_pooled.shape == (pooled,)
    # both parts moved, and started from the prompt (tokens and pooled vector as the CLIP encodes them)
    prompt = tuned["cond"]
    assert torch.equal(e.original, prompt[0][0][0].float())
    assert torch.equal(e.original_pooled, prompt[0][1]["pooled_output"][0].float())
    assert not torch.equal(e.tokens, e.original) and not torch.equal(e.pooled, e.original_pooled)
    if fam.family == "flux":
        assert e.options.get("guidance") == 3.5 and e.base_model["guidance"] == 3.5
    # the node's own held-out report, and an independent check on other seeds and timesteps
    assert e.held_out["after"] < e.held_out["before"], e.held_out
    seeds, steps = [77_000_001, 77_000_002], [300, 700, 999]
    with torch.inference_mode():
        latent = mod.encode_liked(tuned["vae"], tuned["model"], tuned["liked"])
        y_rest = mod._training.pooled_rest(tuned["model"], e.original_pooled, 64, 64, {}, "test", core.SeedInvariantError)
    add_noise = mod.noising_of(tuned["model"])
    with torch.inference_mode(False):
        guidance = e.base_model.get("guidance")
        predict, sigmas = mod.make_predict_noise(tuned["model"], y_rest=y_rest.clone(), guidance=guidance)
        lat = latent.clone()
        before = core.held_out_loss(lat, e.original, predict, sigmas, seeds, steps, pooled=e.original_pooled,
                                    add_noise=add_noise)
        after = core.held_out_loss(lat, e.tokens, predict, sigmas, seeds, steps, pooled=e.pooled, add_noise=add_noise)
    assert after < before, f"held-out loss did not drop: {before:.4f} -> {after:.4f}"
    # the frozen model: every diffusion-model tensor bit-identical after the run
    assert not tuned["changed"], f"the optimisation changed the model: {tuned['changed'][:5]}"
    print(f"\n{fam.family}: held-out loss {before:.4f} -> {after:.4f} ({(after - before) / before * 100:+.1f} %), "
          f"node report {e.held_out['before']:.4f} -> {e.held_out['after']:.4f}; run + sample {tuned['seconds']:.1f} s "
          f"for {ITERS} iterations")


def test_conditioning_and_loader_carry_pooled_vector_and_options(tuned: dict[str, Any], comfy_runner: InProcessRunner,
                                                                 comfy_nodes: ModuleType) -> None:
    fam = tuned["fam"]
    e = T.invariant_core(comfy_nodes).load_embedding(tuned["path"])
    cond, name, _, report = tuned["outs"]
    assert name == f"fam/{fam.family}.safetensors" and f"({LABELS[fam.family]})" in report
    assert len(cond) == 1 and torch.equal(cond[0][0][0], e.tokens)
    assert torch.equal(cond[0][1]["pooled_output"][0], e.pooled)
    prompt_options = tuned["cond"][0][1]
    assert set(cond[0][1]) == set(prompt_options)  # pooled_output (tuned) and e.g. Flux's guidance (kept)
    assert cond[0][1].get("guidance") == prompt_options.get("guidance")
    # the tuned CONDITIONING sampled in a stock KSampler in the same graph
    assert torch.isfinite(tuned["sampled"]).all()

    g = FM.family_base(fam.spec, fam.ckpt_name)
    g["20"] = loader_node(name)
    g.update(sample_with(["20", 0], fam))
    T.ok(comfy_runner.run(g))
    loaded, text = comfy_runner.node_outputs("20")
    assert torch.equal(loaded[0][0], cond[0][0]) and torch.equal(loaded[0][1]["pooled_output"], cond[0][1]["pooled_output"])
    assert {k: v for k, v in loaded[0][1].items() if k != "pooled_output"} == \
        {k: v for k, v in cond[0][1].items() if k != "pooled_output"}
    assert PROMPT in text and LABELS[fam.family] in text
    # the same conditioning samples the same latent, from the file as from the node
    assert torch.equal(comfy_runner.node_outputs("51")[0]["samples"], tuned["sampled"])


def test_files_of_another_family_are_refused(tuned: dict[str, Any], comfy_runner: InProcessRunner,
                                            comfy_nodes: ModuleType, nq_embeddings_dir: Path) -> None:
    fam = tuned["fam"]
    core = T.invariant_core(comfy_nodes)
    e = core.load_embedding(tuned["path"])
    other = FM.FAMILIES[(FM.FAMILIES.index(fam.family) + 1) % len(FM.FAMILIES)]
    e.family, e.base_model["model_class"] = other, "Other"
    core.save_embedding(nq_embeddings_dir / "fam" / f"{fam.family}_as_{other}.safetensors", e)
    g = FM.family_base(fam.spec, fam.ckpt_name)
    g["20"] = loader_node(f"fam/{fam.family}_as_{other}.safetensors")
    msg = T.run_error(comfy_runner.run(g))
    assert f"made on the {LABELS[other]} ('{other}') family (Other)" in msg, msg
    assert f"the connected model is {LABELS[fam.family]} ('{fam.family}')" in msg and "make a new embedding" in msg


def test_legacy_sd_file_is_refused_on_another_family(tiny_sd3: FM.TinyFamily, comfy_runner: InProcessRunner,
                                                     nq_embeddings_dir: Path) -> None:
    """A version-1 file (written before families: SD1.x/SD2.x was all the node took) reads as family 'sd'."""
    from safetensors.torch import save_file

    meta = {"format": "noisequery.seed_invariant_prompt", "format_version": 1, "settings": {},
            "base_model": {"model_class": "SD15", "context_dim": 768, "fingerprint": "0123456789abcdef"}}
    (nq_embeddings_dir / "fam").mkdir(exist_ok=True)
    save_file({"tokens": torch.zeros(77, 768), "original": torch.zeros(77, 768)},
              str(nq_embeddings_dir / "fam" / "legacy_sd15.safetensors"),
              metadata={"noisequery_embedding": json.dumps(meta)})
    g = FM.family_base(tiny_sd3.spec, tiny_sd3.ckpt_name)
    g["20"] = loader_node("fam/legacy_sd15.safetensors")
    msg = T.run_error(comfy_runner.run(g))
    assert "made on the SD1.x/SD2.x ('sd') family (SD15)" in msg and "SD3/SD3.5 ('sd3')" in msg, msg


def test_interrupted_sd3_run_resumes_to_the_uninterrupted_result(tiny_sd3: FM.TinyFamily,
                                                                 comfy_runner: InProcessRunner,
                                                                 comfy_nodes: ModuleType,
                                                                 nq_embeddings_dir: Path) -> None:
    core, mod = T.invariant_core(comfy_nodes), T.invariant_nodes(comfy_nodes)
    T.ok(comfy_runner.run(graph(tiny_sd3, invariant_node("fam/sd3_full", checkpoint_every=5))))
    full = core.load_embedding(nq_embeddings_dir / "fam" / "sd3_full.safetensors")

    with T.interrupt_at_check(mod, 3):  # before iteration 2 (checkpoint_every 5: the stop itself saves)
        entry = comfy_runner.run(graph(tiny_sd3, invariant_node("fam/sd3_cut", checkpoint_every=5)))
    assert comfy_harness.execution_error(entry)["event"] == "execution_interrupted"
    saved = core.load_embedding(nq_embeddings_dir / "fam" / "sd3_cut.safetensors.checkpoint")
    assert saved.iterations_done == 2 and saved.pooled is not None and saved.family == "sd3"

    T.ok(comfy_runner.run(graph(tiny_sd3, invariant_node("fam/sd3_cut", checkpoint_every=5))))  # resumes at 2
    cut = core.load_embedding(nq_embeddings_dir / "fam" / "sd3_cut.safetensors")
    assert torch.equal(cut.tokens, full.tokens) and torch.equal(cut.pooled, full.pooled)
    assert cut.loss_history == full.loss_history and cut.held_out == full.held_out


# --------------------------------------------------------------------------------------------- POST /prompt


def test_post_prompt_tunes_and_samples_on_sd3(tiny_sd3: FM.TinyFamily, embeddings_server: Any,
                                              tiny_ckpt_name: str) -> None:
    """SD3 through POST /prompt: liked render -> seed-invariant prompt -> a stock KSampler on another seed; then the
    Load node's conditioning samples too, and an SD1.5 model refuses the file."""
    server, emb = embeddings_server
    g = graph(tiny_sd3, invariant_node("server/sd3", iterations=2))
    g.update(sample_with([NODE, 0], tiny_sd3))
    entry = T.ok(server.run(g, timeout=600))
    assert (emb / "server" / "sd3.safetensors").is_file()
    assert comfy_harness.output_images(entry)
    info = server.object_info("NoiseQueryLoadInvariantPrompt")["NoiseQueryLoadInvariantPrompt"]
    assert "server/sd3.safetensors" in info["input"]["required"]["embedding"][1]["options"]
    g = FM.family_base(tiny_sd3.spec, tiny_sd3.ckpt_name)
    g["20"] = loader_node("server/sd3.safetensors")
    g.update(sample_with(["20", 0], tiny_sd3))
    assert comfy_harness.output_images(T.ok(server.run(g, timeout=600)))
    # the SD1.5 model refuses the SD3 file through the server too, naming both families
    g = G.base(tiny_ckpt_name)
    g["20"] = loader_node("server/sd3.safetensors")
    msg = T.run_error(server.run(g, timeout=300))
    assert "made on the SD3/SD3.5 ('sd3') family" in msg and "SD1.x/SD2.x ('sd')" in msg, msg
