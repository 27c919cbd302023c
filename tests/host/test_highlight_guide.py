"""HighlightScribbleGuide in a real ComfyUI with the tiny random SD1.5 checkpoint.

The measurement the issue asks for: hook the UNet's cross-attention (ComfyUI's attention override, chained under
the guide's so it sees the guide's bias) and compute, for the highlighted phrase, the share of its attention mass
inside its region, without and with guidance; other tokens' maps must stay close to unguided. Then end-to-end
sampling through KSampler in-process (strokes and masks) and through POST /prompt with MASK inputs, refocusing,
and the error paths.
"""
from __future__ import annotations

import json
from types import ModuleType, SimpleNamespace
from typing import Any

import comfy_harness
import nq_graphs as G
import nq_highlight as H
import pytest
import torch
from comfy_harness import ComfyServer, InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

SIZE = 128  # 16 x 16 latent: 256 attention positions per cross-attention layer


def guide_inputs(**overrides: Any) -> dict[str, Any]:
    return H.guide_inputs(**{"width": SIZE, "height": SIZE, **overrides})


@pytest.fixture(scope="module")
def loaded(comfy_nodes: ModuleType, tiny_ckpt_name: str) -> tuple[Any, Any, Any]:
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_ckpt_name)[:3]


AttentionProbe = comfy_harness.CrossAttentionProbe


def _probe_model(model: Any, probe: AttentionProbe) -> Any:
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    return m


def _run_guide(comfy_nodes: ModuleType, model: Any, clip: Any, **overrides: Any) -> Any:
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["HighlightScribbleGuide"]
    with torch.inference_mode():
        return cls.execute(model=model, clip=clip, **guide_inputs(**overrides))


def _sample(comfy_nodes: ModuleType, model: Any, clip: Any, positive: Any, steps: int = 1, seed: int = 3,
            size: int = SIZE) -> torch.Tensor:
    with torch.inference_mode():
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        out = comfy_nodes.common_ksampler(model, seed, steps, 7.0, "euler", "normal", positive, negative,
                                          {"samples": torch.zeros(1, 4, size // 8, size // 8)})
        return out[0]["samples"]


def _measure(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any], strength: float, **overrides: Any
             ) -> tuple[list[float], list[torch.Tensor], Any]:
    """Mass inside the region per cond-row cross-attention call of one sampling step, the probability maps,
    and the runtime."""
    model, clip, _ = loaded
    probe = AttentionProbe()
    out = _run_guide(comfy_nodes, _probe_model(model, probe), clip, strength=strength, **overrides)
    patched, cond = out.args[0], out.args[1]
    runtime = patched.model_options["transformer_options"]["optimized_attention_override"]
    _sample(comfy_nodes, patched, clip, cond)
    cols = runtime.token_columns[0]
    masses, maps = [], []
    for grid, cou, p in probe.records:
        region = runtime.regions(*grid)[0]  # [h*w] of the (only) highlight
        per = p.shape[0] // len(cou)
        for i in range(p.shape[0]):
            if cou[i // per] != 0:
                continue
            phrase = p[i][:, cols].sum(-1)
            masses.append(float((phrase * region).sum() / phrase.sum()))
            maps.append(p[i])
    assert masses, "the probe saw no cross-attention of the positive prompt"
    return masses, maps, runtime


# ---------------------------------------------------------------------------------------- attention mass


def test_guidance_concentrates_the_phrase_in_its_region(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    base, base_maps, runtime = _measure(comfy_nodes, loaded, 0.0)
    guided, guided_maps, _ = _measure(comfy_nodes, loaded, 1.0)
    area = float(runtime.regions(SIZE // 8, SIZE // 8)[0].mean())
    assert 0.1 < area <= 0.25, f"test region should cover <= 25% of the image, covers {area:.1%}"
    base_mean, guided_mean = sum(base) / len(base), sum(guided) / len(guided)
    print(f"region {area:.1%}: phrase attention mass inside, unguided {base_mean:.3f}, guided {guided_mean:.3f} "
          f"(min {min(guided):.3f} over {len(guided)} layers)")
    assert base_mean < area + 0.1, "unguided, the phrase should spread roughly evenly"
    assert min(guided) >= 0.8, guided
    assert guided_mean > base_mean + 0.4
    # Other tokens (not the phrase) keep their spatial maps close to unguided.
    cols = set(runtime.token_columns[0])
    others = [j for j in range(1, 9) if j not in cols]
    for a, b in zip(base_maps, guided_maps):
        for j in others:
            x, y = a[:, j] / a[:, j].sum(), b[:, j] / b[:, j].sum()
            assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.95, j
            assert float((x - y).abs().sum() / 2) < 0.15, j


def test_strength_scales_the_effect_and_schedule_ends_it(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    half = _measure(comfy_nodes, loaded, 0.5)[0]
    full = _measure(comfy_nodes, loaded, 1.0)[0]
    assert sum(half) / len(half) < sum(full) / len(full)
    # A guided range that ends before the first step leaves attention unguided.
    late = _measure(comfy_nodes, loaded, 1.0, start_percent=0.5, end_percent=1.0)[0]
    assert max(late) < 0.4


def test_mask_highlight_concentrates_too(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    mask_node = comfy_nodes.NODE_CLASS_MAPPINGS["NoiseQueryHighlightMask"]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, SIZE // 2:, SIZE // 2:] = 1.0  # bottom-right quarter
    with torch.inference_mode():
        hl = mask_node.execute(mask=mask, phrase="a red ball").args[0]
    masses, _, runtime = _measure(comfy_nodes, loaded, 1.0, highlights="", mask_highlights=hl)
    assert abs(float(runtime.regions(SIZE // 8, SIZE // 8)[0].mean()) - 0.25) < 0.01
    assert min(masses) >= 0.8


def test_input_model_is_left_unpatched(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    model, clip, _ = loaded
    out = _run_guide(comfy_nodes, model, clip)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    assert "optimized_attention_override" in out.args[0].model_options["transformer_options"]
    assert "a cat" in out.ui["text"][0] and out.args[2].shape == (1, SIZE // 4, SIZE // 4, 3)


def test_strength_zero_is_bit_identical_to_plain_sampling(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]
                                                          ) -> None:
    model, clip, _ = loaded
    out = _run_guide(comfy_nodes, model, clip, strength=0.0)
    with torch.inference_mode():
        plain_cond = comfy_nodes.CLIPTextEncode().encode(clip, H.PROMPT)[0]
    assert torch.equal(out.args[1][0][0], plain_cond[0][0])
    a = _sample(comfy_nodes, out.args[0], clip, out.args[1], steps=2)
    b = _sample(comfy_nodes, model, clip, plain_cond, steps=2)
    assert torch.equal(a, b)
    guided = _run_guide(comfy_nodes, model, clip, strength=1.0)
    c = _sample(comfy_nodes, guided.args[0], clip, guided.args[1], steps=2)
    assert not torch.equal(a, c)


def test_refocusing_lowers_the_attention_loss(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    model, clip, _ = loaded
    out = _run_guide(comfy_nodes, model, clip, strength=0.0, refocus_percent=0.5, refocus_iterations=4,
                     refocus_step_size=0.2)
    runtime = out.args[0].model_options["transformer_options"]["optimized_attention_override"]
    latent = _sample(comfy_nodes, out.args[0], clip, out.args[1], steps=2)
    assert torch.isfinite(latent).all()
    assert runtime.refocus_calls == 4, "refocusing runs in the first half of sampling only (1 of 2 steps)"
    losses = [loss for _sigma, _it, loss in runtime.refocus_losses]
    print("refocus losses per iteration:", [round(x, 4) for x in losses])
    assert losses[-1] < losses[0]
    plain = _sample(comfy_nodes, _run_guide(comfy_nodes, model, clip, strength=0.0).args[0], clip, out.args[1], steps=2)
    assert not torch.equal(latent, plain)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, words", [
    ({"highlights": H.strokes({**H.CAT_STROKE, "phrase": "a dog"})}, "'a dog' is not in the prompt"),
    ({"highlights": ""}, "no highlights"),
    ({"highlights": H.strokes()}, "no highlights"),
])
def test_bad_highlights_fail_clearly(overrides: dict[str, Any], words: str, comfy_nodes: ModuleType,
                                     loaded: tuple[Any, Any, Any]) -> None:
    from noisequery_core.errors import HighlightError  # the core as tests import it

    model, clip, _ = loaded
    with pytest.raises(Exception) as err:
        _run_guide(comfy_nodes, model, clip, **overrides)
    assert type(err.value).__name__ == HighlightError.__name__ and words in str(err.value), str(err.value)


def test_models_without_a_unet_are_refused(comfy_nodes: ModuleType) -> None:
    guide_mod = G.pack_module(comfy_nodes, "nodes.guidance_nodes")
    fake = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(Exception, match="cannot guide"):
        guide_mod.check_model(fake)


def test_empty_mask_is_refused(comfy_nodes: ModuleType) -> None:
    mask_node = comfy_nodes.NODE_CLASS_MAPPINGS["NoiseQueryHighlightMask"]
    with pytest.raises(Exception, match="is empty"):
        mask_node.execute(mask=torch.zeros(1, 32, 32), phrase="a cat")


# ---------------------------------------------------------------------------------------- graphs


def guide_graph(ckpt: str, *, masks: bool = False, **overrides: Any) -> dict[str, Any]:
    """Checkpoint -> HighlightScribbleGuide "10" (strokes, or masks built from SolidMask/MaskComposite) -> KSampler
    -> VAEDecode -> PreviewImage ("t3")."""
    g = G.base(ckpt)
    inputs = {"model": [G.CKPT, 0], "clip": [G.CKPT, 1], **guide_inputs(**overrides)}
    if masks:
        inputs["highlights"] = ""
        g["m0"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
        g["m1"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE // 2}}
        g["m2"] = {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0],
                                                             "x": 0, "y": SIZE // 2, "operation": "add"}}
        g["m3"] = {"class_type": "NoiseQueryHighlightMask", "inputs": {"mask": ["m2", 0], "phrase": "a cat"}}
        g["m4"] = {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0],
                                                             "x": SIZE // 2, "y": 0, "operation": "add"}}
        g["m5"] = {"class_type": "NoiseQueryHighlightMask", "inputs": {"mask": ["m4", 0], "phrase": "red ball",
                                                                       "previous": ["m3", 0]}}
        inputs["mask_highlights"] = ["m5", 0]
    g["10"] = {"class_type": "HighlightScribbleGuide", "inputs": inputs}
    tail = G.ksampler_image("t", 5, steps=2, cfg=5.0, size=SIZE, model=["10", 0])
    tail["t1"]["inputs"]["positive"] = ["10", 1]
    g.update(tail)
    return g


@pytest.mark.parametrize("masks", [False, True], ids=["strokes", "masks"])
def test_guide_runs_through_ksampler_in_process(masks: bool, comfy_runner: InProcessRunner, tiny_ckpt_name: str
                                                ) -> None:
    entry = comfy_runner.run(guide_graph(tiny_ckpt_name, masks=masks))
    assert comfy_harness.execution_error(entry) is None, entry
    image = comfy_runner.node_outputs("t2")[0]
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
    text = G.ui_text(entry, "10")
    assert ("2 masks" not in text) and ("'a cat'" in text)
    if masks:
        assert "'red ball'" in text


def test_guide_over_http_with_masks(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    entry = comfy_server.run(guide_graph(tiny_ckpt_name, masks=True, seed=1), timeout=300)
    assert comfy_harness.execution_error(entry) is None, entry["status"]
    images = comfy_harness.output_images(entry, "t3")
    assert len(images) == 1
    png = comfy_server.get_image(images[0]["filename"], images[0].get("subfolder", ""), images[0]["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'red ball'" in "\n".join(entry["outputs"]["10"]["text"])


def test_bad_strokes_json_is_refused_over_http(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    body = comfy_server.post_prompt(guide_graph(tiny_ckpt_name, highlights='{"strokes": [{"phrase": "a cat"'))
    assert isinstance(body, dict) and body["error"]["type"] == "prompt_outputs_failed_validation", body
    details = json.dumps(body["node_errors"]["10"])
    assert "not valid JSON" in details
    missing = comfy_server.post_prompt(guide_graph(tiny_ckpt_name,
                                                   highlights=H.strokes({**H.CAT_STROKE, "phrase": "a dog"})))
    assert isinstance(missing, str)
    entry = comfy_server.wait(missing, timeout=120)
    err = comfy_harness.execution_error(entry)
    assert err is not None and "'a dog' is not in the prompt" in err["exception_message"]
    assert comfy_server.alive and "KSampler" in comfy_server.object_info("KSampler")


def _shrunk_example(name: str, ckpt: str) -> dict[str, Any]:
    """An example workflow on the tiny checkpoint: every size and mask offset scaled from 512 to SIZE, 2 steps."""
    graph = json.loads((G.REPO_ROOT / "example_workflows" / "api" / name).read_text(encoding="utf-8"))
    scale = SIZE / 512
    for node in graph.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        for key in ("width", "height", "x", "y"):
            if isinstance(inputs.get(key), int):
                inputs[key] = int(inputs[key] * scale)
        if "steps" in inputs:
            inputs["steps"] = 2
    return graph


@pytest.mark.parametrize("name", ["highlight_scribble_guide.json", "highlight_masks_headless.json"])
def test_example_workflows_run_over_http(name: str, comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    entry = comfy_server.run(_shrunk_example(name, tiny_ckpt_name), timeout=300)
    assert comfy_harness.execution_error(entry) is None, entry["status"]
    assert len(comfy_harness.output_images(entry, "7")) == 1  # SaveImage
    assert len(comfy_harness.output_images(entry, "8")) == 1  # region preview
    text = "\n".join(entry["outputs"]["2"]["text"])
    assert "'a cat'" in text and "'a red ball'" in text


# ---------------------------------------------------------------------------------------- SDXL


def tiny_sdxl_model() -> Any:
    """A ModelPatcher around a 2-level SDXL-architecture UNet (context 2048, ADM 2816, linear transformer in/out)
    with seeded random weights, built from ComfyUI's own SDXL config (the harness has no SDXL checkpoint)."""
    import comfy.supported_models

    unet_config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                   "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1],
                   "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
                   "adm_in_channels": 2816, "num_classes": "sequential", "use_temporal_resblock": False,
                   "use_temporal_attention": False}
    return H.random_model(comfy.supported_models.SDXL(unet_config), 0)


def test_sdxl_unet_is_guided_at_every_level(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    """SDXL's UNet (two attention levels here, ADM input) gets the same guidance. The CLIP-L tokenizer is shared
    by SD1.x and SDXL, so the SD1.5 CLIP finds the token positions; the conditioning is SDXL-shaped random."""
    _model, clip, _ = loaded
    probe = AttentionProbe()
    with torch.inference_mode():
        model = tiny_sdxl_model()
        out = _run_guide(comfy_nodes, _probe_model(model, probe), clip)
        patched = out.args[0]
        gen = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
        neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
        comfy_nodes.common_ksampler(patched, 3, 1, 5.0, "euler", "normal", pos, neg,
                                    {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)})
    runtime = patched.model_options["transformer_options"]["optimized_attention_override"]
    cols = runtime.token_columns[0]
    grids: dict[int, list[float]] = {}
    for latent_hw, cou, p in probe.records:
        h, w = latent_hw
        n = p.shape[1]
        level = (h, w) if n == h * w else ((h + 1) // 2, (w + 1) // 2)
        assert level[0] * level[1] == n
        region = runtime.regions(*level)[0]
        per = p.shape[0] // len(cou)
        for i in range(p.shape[0]):
            if cou[i // per] == 0:
                phrase = p[i][:, cols].sum(-1)
                grids.setdefault(n, []).append(float((phrase * region).sum() / phrase.sum()))
    print("SDXL phrase mass inside per level (queries: masses):", {k: [round(x, 3) for x in v] for k, v in grids.items()})
    assert len(grids) == 2, "both attention resolutions must be guided"
    assert all(min(v) >= 0.8 for v in grids.values()), grids
    assert runtime.layers_seen >= 4


def test_gligen_grounding_matches_comfyuis_textbox_node(comfy_nodes: ModuleType, loaded: tuple[Any, Any, Any]) -> None:
    """With a GLIGEN model connected, each phrase gets its stroke's bounding box in exactly the entry ComfyUI's
    GLIGENTextBoxApply writes for that box (a stand-in object as the model: no GLIGEN weights fit the tiny UNet,
    so this checks the grounding data, not GLIGEN's sampling)."""
    model, clip, _ = loaded
    stand_in = object()
    # edge_softness 0: x 0.15..0.85 (round caps), y 0.45..0.55, plus the 0.35-cell anti-aliasing falloff of
    # stroke_map (>= 0.5 up to 0.41 cell further) -> cells x 4..27, y 14..17 of a 32 x 32 latent
    stroke = {"phrase": "a cat", "width": 0.1, "points": [[0.2, 0.5], [0.8, 0.5]]}
    out = _run_guide(comfy_nodes, model, clip, highlights=H.strokes(stroke), width=256, height=256, edge_softness=0.0,
                     gligen=stand_in)
    kind, got_model, params = out.args[1][0][1]["gligen"]
    assert kind == "position" and got_model is stand_in and len(params) == 1
    pooled, h, w, y, x = params[0]
    assert (h, w, y, x) == (4, 24, 14, 4), (h, w, y, x)
    with torch.inference_mode():
        plain = comfy_nodes.CLIPTextEncode().encode(clip, H.PROMPT)[0]
        ref = comfy_nodes.GLIGENTextBoxApply().append(plain, clip, stand_in, "a cat", w * 8, h * 8, x * 8, y * 8)[0]
    r_pooled, *r_box = ref[0][1]["gligen"][2][0]
    assert list(r_box) == [h, w, y, x] and torch.equal(r_pooled, pooled)
    assert "gligen" not in _run_guide(comfy_nodes, model, clip).args[1][0][1]
