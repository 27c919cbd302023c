"""HighlightScribbleGuide on joint attention in a real ComfyUI: tiny random SD3 (MMDiT) and Flux diffusion models.

The same measurement as tests/host/test_highlight_guide.py on SD1.5, on the joint attention of every block (Flux:
double- and single-stream; SD3: every joint block): a probe (ComfyUI's attention override, chained under the
guide's so it sees the guide's bias) records softmax(QK^T/sqrt(d) + mask) over the whole text+image sequence;
the phrase's attention mass inside its region is read on the image-query rows x phrase-key columns, the text side on
phrase-query rows x image-key columns, other tokens' maps are compared with unguided ones.

Two kinds of tiny model:
* for the measurements, SD3 and Flux diffusion models built in-process from ComfyUI's own model classes
  (supported_models.SD3 / Flux, model_base) with a narrow config (Flux: 2 double- + 2 single-stream blocks of width 64;
  SD3: 2 joint blocks) and seeded random weights, sampled at 256 x 192 (16 x 12 image tokens, 4:3), so a region has
  enough tokens to be measured; ComfyUI's loader would fix Flux's width at 3072 (24 heads x 128), seconds per step on
  two cores;
* the family checkpoints of tests/host/family_models.py, loaded by CheckpointLoaderSimple, for the guide on what the
  stock loader gives, in-process and through POST /prompt (SDXL too).
The CLIP is family_models' tiny one: ComfyUI's real SD3 / Flux text-encoder wrappers and real tokenizers (the files
that ship with ComfyUI) with one-to-three-layer configs; T5 is padded to 8 rows instead of 77 / 256 (a T5-XXL cannot
be made small through ComfyUI's loader).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import comfy_harness
import family_models as FM
import nq_graphs as G
import nq_highlight as H
import pytest
import torch

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

WIDTH, HEIGHT = 256, 192  # 4:3 -> latent 32 x 24 -> 16 x 12 image tokens (patch 2)
SHAPE_KEY = "noisequery_highlight_shape"  # kept in sync with nodes/guidance_runtime.py


def guide_inputs(**overrides: Any) -> dict[str, Any]:
    return H.guide_inputs(**{"width": WIDTH, "height": HEIGHT, **overrides})


# ---------------------------------------------------------------------------------------- tiny models


def tiny_flux() -> Any:
    """Flux-architecture model: 2 double- and 2 single-stream blocks, width 64, 2 heads, guidance input."""
    import comfy.supported_models

    cfg = comfy.supported_models.Flux({
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True, "txt_ids_dims": []})
    return H.random_model(cfg, 0)


def tiny_sd3() -> Any:
    """MMDiT (SD3) model: 2 joint blocks (width 128, 2 heads), pooled 2048 input, T5-width context."""
    import comfy.supported_models

    cfg = comfy.supported_models.SD3({
        "in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "depth": 2, "num_patches": 1024,
        "pos_embed_max_size": 32, "adm_in_channels": 2048, "out_channels": 16,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}}})
    return H.random_model(cfg, 1)


FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def joint_models(comfy_nodes: ModuleType) -> dict[str, tuple[Any, Any]]:
    """family -> (tiny in-process diffusion model, the family's tiny real CLIP from family_models)."""
    with torch.inference_mode():
        return {"sd3": (tiny_sd3(), FM.tiny_clip("sd3")), "flux": (tiny_flux(), FM.tiny_clip("flux"))}


class JointProbe:
    """An optimized_attention_override recording softmax(QK^T/sqrt(d) + mask), averaged over heads, of every
    joint-attention call (text + image tokens), with the call's latent shape and batch flags."""

    def __init__(self) -> None:
        self.records: list[tuple[tuple[int, int, int], list[int], torch.Tensor]] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> JointProbe:
        return self

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        q, k = args[:2]
        heads = args[3] if len(args) > 3 else kwargs["heads"]  # MMDiT passes heads by name
        to = kwargs.get("transformer_options") or {}
        shape = to.get(SHAPE_KEY)
        if shape is not None:
            if kwargs.get("skip_reshape", False):
                qh, kh = q.float(), k.float()
            else:
                b, n, inner = q.shape
                qh = q.reshape(b, n, heads, inner // heads).transpose(1, 2).float()
                kh = k.reshape(b, -1, heads, inner // heads).transpose(1, 2).float()
            sim = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
            mask = kwargs.get("mask")
            if mask is not None:
                sim = sim + (mask[:, None] if mask.ndim == 3 else mask).float()
            self.records.append((tuple(shape), list(to["cond_or_uncond"]), sim.softmax(-1).mean(1)))
        return func(*args, **kwargs)


def _probe_model(model: Any, probe: JointProbe) -> Any:
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    return m


def _run_guide(comfy_nodes: ModuleType, model: Any, clip: Any, **overrides: Any) -> Any:
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["HighlightScribbleGuide"]
    with torch.inference_mode():
        return cls.execute(model=model, clip=clip, **guide_inputs(**overrides))


def _negative(clip: Any) -> list[list[Any]]:
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def _sample(comfy_nodes: ModuleType, model: Any, clip: Any, positive: Any, steps: int = 1, seed: int = 3,
            cfg: float = 4.0, width: int = WIDTH, height: int = HEIGHT) -> torch.Tensor:
    with torch.inference_mode():
        out = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, _negative(clip),
                                          {"samples": torch.zeros(1, 16, height // 8, width // 8)})
        return out[0]["samples"]


def _layout(shape: tuple[int, int, int], n: int) -> tuple[slice, slice, tuple[int, int]]:
    h, w, n_text = shape
    grid = ((h + 1) // 2, (w + 1) // 2)
    assert n_text + grid[0] * grid[1] == n, "the sequence is the text then the image"
    return slice(0, n_text), slice(n_text, n), grid


def _measure(comfy_nodes: ModuleType, joint_models: dict[str, Any], family: str, strength: float,
             **overrides: Any) -> dict[str, Any]:
    """Per positive-row joint-attention call of one sampling step: the phrase's mass inside its region (image side
    and text side) and the probability maps."""
    model, clip = joint_models[family]
    probe = JointProbe()
    out = _run_guide(comfy_nodes, _probe_model(model, probe), clip, strength=strength, **overrides)
    patched, cond = out.args[0], out.args[1]
    runtime = patched.model_options["transformer_options"]["optimized_attention_override"]
    _sample(comfy_nodes, patched, clip, cond, width=overrides.get("width", WIDTH),
            height=overrides.get("height", HEIGHT))
    cols = runtime.token_columns[0]
    got: dict[str, Any] = {"image": [], "text": [], "maps": [], "runtime": runtime, "area": None}
    for shape, cou, p in probe.records:
        _text, img, grid = _layout(shape, p.shape[-1])
        region = runtime.regions(*grid)[0]
        got["area"] = float(region.mean())
        per = p.shape[0] // len(cou)
        for i in range(p.shape[0]):
            if cou[i // per] != 0:
                continue
            phrase = p[i][img][:, cols].sum(-1)  # image queries' attention to the phrase keys
            got["image"].append(float((phrase * region).sum() / phrase.sum()))
            reads = p[i][cols][:, img].sum(0)  # the phrase queries' attention to the image keys
            got["text"].append(float((reads * region).sum() / reads.sum()))
            got["maps"].append(p[i][img])
    assert got["image"], "the probe saw no joint attention of the positive prompt"
    return got


# ---------------------------------------------------------------------------------------- attention mass


@pytest.mark.parametrize("family", FAMILIES)
def test_phrase_tokens_are_found_in_t5_and_clip(family: str, comfy_nodes: ModuleType,
                                                joint_models: dict[str, Any]) -> None:
    model, clip = joint_models[family]
    runtime = _run_guide(comfy_nodes, model, clip).args[0].model_options["transformer_options"][
        "optimized_attention_override"]
    cols = runtime.token_columns[0]
    t5_ids = clip.tokenizer.t5xxl.tokenizer("a cat")["input_ids"][:-1]  # without </s>
    t5 = list(range(len(t5_ids)))  # the prompt starts with the phrase; T5 has no start token
    assert [int(t[0]) for t in clip.tokenize(H.PROMPT)["t5xxl"][0]][:len(t5)] == t5_ids
    n_t5 = len(clip.tokenize(H.PROMPT)["t5xxl"][0])
    if family == "flux":
        assert runtime.context_len == n_t5 and cols == t5, cols  # T5 only
    else:
        assert runtime.context_len == 77 + n_t5 and cols == [1, 2] + [77 + i for i in t5], cols  # CLIP, then T5


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_concentrates_the_phrase_in_its_region(family: str, comfy_nodes: ModuleType,
                                                        joint_models: dict[str, Any]) -> None:
    base = _measure(comfy_nodes, joint_models, family, 0.0)
    guided = _measure(comfy_nodes, joint_models, family, 1.0)
    area = guided["area"]
    assert 0.1 < area <= 0.25, f"test region should cover <= 25% of the image, covers {area:.1%}"
    n_blocks = {"sd3": 2, "flux": 4}[family]
    assert len(guided["image"]) == n_blocks, "every joint block (Flux: double and single) is guided"
    print(f"{family}: region {area:.1%}; image->phrase mass inside unguided {sum(base['image']) / len(base['image']):.3f}"
          f", guided {sum(guided['image']) / len(guided['image']):.3f} (min {min(guided['image']):.3f} over "
          f"{len(guided['image'])} blocks); phrase->image inside unguided {sum(base['text']) / len(base['text']):.3f}, "
          f"guided {sum(guided['text']) / len(guided['text']):.3f} (min {min(guided['text']):.3f})")
    assert max(base["image"]) < area + 0.15, "unguided, the phrase spreads over the image"
    assert min(guided["image"]) >= 0.8, guided["image"]
    assert min(guided["text"]) >= 0.8, ("the phrase reads its region (no leak)", guided["text"])
    # Other text tokens keep their spatial maps close to unguided.
    runtime = guided["runtime"]
    cols = set(runtime.token_columns[0])
    others = [j for j in range(runtime.context_len) if j not in cols][:12]
    for a, b in zip(base["maps"], guided["maps"]):
        for j in others:
            x, y = a[:, j] / a[:, j].sum(), b[:, j] / b[:, j].sum()
            assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.95, j
            assert float((x - y).abs().sum() / 2) < 0.15, j


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width, height", [(128, 256), (320, 128)])
def test_any_aspect_ratio(family: str, width: int, height: int, comfy_nodes: ModuleType,
                          joint_models: dict[str, Any]) -> None:
    mask_node = comfy_nodes.NODE_CLASS_MAPPINGS["NoiseQueryHighlightMask"]
    mask = torch.zeros(1, height, width)
    mask[:, height // 2:, width // 2:] = 1.0  # bottom-right quarter
    with torch.inference_mode():
        hl = mask_node.execute(mask=mask, phrase="a red ball").args[0]
    got = _measure(comfy_nodes, joint_models, family, 1.0, highlights="", mask_highlights=hl, width=width,
                   height=height)
    assert abs(got["area"] - 0.25) < 0.02
    assert min(got["image"]) >= 0.8 and min(got["text"]) >= 0.8, got["image"]


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_scales_the_effect_and_schedule_ends_it(family: str, comfy_nodes: ModuleType,
                                                         joint_models: dict[str, Any]) -> None:
    half = _measure(comfy_nodes, joint_models, family, 0.5)["image"]
    full = _measure(comfy_nodes, joint_models, family, 1.0)["image"]
    assert sum(half) / len(half) < sum(full) / len(full)
    late = _measure(comfy_nodes, joint_models, family, 1.0, start_percent=0.5, end_percent=1.0)["image"]
    assert max(late) < 0.5, "a range that starts after the first step leaves it unguided"


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_is_bit_identical_to_plain_sampling(family: str, comfy_nodes: ModuleType,
                                                          joint_models: dict[str, Any]) -> None:
    model, clip = joint_models[family]
    out = _run_guide(comfy_nodes, model, clip, strength=0.0)
    with torch.inference_mode():
        plain_cond = clip.encode_from_tokens_scheduled(clip.tokenize(H.PROMPT))
    assert torch.equal(out.args[1][0][0], plain_cond[0][0])
    a = _sample(comfy_nodes, out.args[0], clip, out.args[1], steps=2)
    b = _sample(comfy_nodes, model, clip, plain_cond, steps=2)
    assert torch.equal(a, b)
    guided = _run_guide(comfy_nodes, model, clip, strength=1.0)
    c = _sample(comfy_nodes, guided.args[0], clip, guided.args[1], steps=2)
    assert not torch.equal(a, c)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def _refocus_run(comfy_nodes: ModuleType, joint_models: dict[str, Any], family: str) -> None:
    model, clip = joint_models[family]
    out = _run_guide(comfy_nodes, model, clip, strength=0.0, refocus_percent=0.3, refocus_iterations=4,
                     refocus_step_size=0.2)
    runtime = out.args[0].model_options["transformer_options"]["optimized_attention_override"]
    latent = _sample(comfy_nodes, out.args[0], clip, out.args[1], steps=2)
    assert torch.isfinite(latent).all()
    assert runtime.refocus_calls == 4, "refocusing runs in the first 30 % of sampling only (1 of 2 steps)"
    losses = [loss for _sigma, _it, loss in runtime.refocus_losses]
    print(f"{family} refocus losses per iteration:", [round(x, 4) for x in losses])
    assert losses[-1] < losses[0]
    plain = _sample(comfy_nodes, _run_guide(comfy_nodes, model, clip, strength=0.0).args[0], clip, out.args[1],
                    steps=2)
    assert not torch.equal(latent, plain)


def test_refocusing_lowers_the_attention_loss_on_sd3(comfy_nodes: ModuleType, joint_models: dict[str, Any]) -> None:
    """MMDiT's joint attention is differentiable with respect to the latent: refocusing runs on SD3."""
    _refocus_run(comfy_nodes, joint_models, "sd3")


def test_flux_refocusing_is_refused_with_the_reason(comfy_nodes: ModuleType, joint_models: dict[str, Any]) -> None:
    """No gradient flows from Flux's attention back to the latent in ComfyUI 0.8.0 (in-place adds in its blocks; the
    comfy_kitchen rope kernel has no backward): the guide says so before sampling instead of failing mid-run. If
    ComfyUI's Flux becomes differentiable, the second half fails: then enable refocusing on Flux."""
    model, clip = joint_models["flux"]
    with pytest.raises(Exception, match="refocusing cannot run on Flux") as err:
        _run_guide(comfy_nodes, model, clip, refocus_percent=0.5, refocus_iterations=2)
    assert "refocus_percent to 0" in str(err.value)
    _run_guide(comfy_nodes, model, clip, refocus_percent=0.0, refocus_iterations=2)  # guidance alone is fine
    net = tiny_flux().model  # built outside inference mode: weights autograd accepts
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(1, 16, 8, 8, requires_grad=True)
        out = net.apply_model(x, torch.tensor([0.5]), c_crossattn=torch.randn(1, 8, 4096), y=torch.zeros(1, 768),
                              guidance=torch.tensor([3.5]))
        with pytest.raises(RuntimeError, match="inplace operation|no autograd formula"):
            torch.autograd.grad(out.square().mean(), x)


def test_flow_progress_follows_the_models_own_schedule(comfy_nodes: ModuleType,
                                                       joint_models: dict[str, Any]) -> None:
    """sigma -> progress inverts percent_to_sigma of SD3's shifted flow sampling (the schedule's clock)."""
    guide_mod = comfy_harness_pack_module(comfy_nodes)
    for family in FAMILIES:
        model, _clip = joint_models[family]
        ms = model.get_model_object("model_sampling")
        f = guide_mod.flow_sigma_to_percent_fn(ms)
        for p in (0.0, 0.1, 0.37, 0.8):
            assert f(float(ms.percent_to_sigma(p))) == pytest.approx(p, abs=1e-6)


def comfy_harness_pack_module(comfy_nodes: ModuleType) -> Any:
    return G.pack_module(comfy_nodes, "nodes.guidance_nodes")


class _OddClip:
    """A CLIP whose conditioning length fits no layout the guide knows."""

    def __init__(self, clip: Any):
        self.tokenizer, self.cond_stage_model, self._clip = clip.tokenizer, clip.cond_stage_model, clip

    def tokenize(self, text: str) -> Any:
        return self._clip.tokenize(text)

    def encode_from_tokens_scheduled(self, tokens: Any) -> list[list[Any]]:
        return [[torch.zeros(1, 300, 4096), {"pooled_output": torch.zeros(1, 768)}]]


def test_unknown_text_layout_is_refused(comfy_nodes: ModuleType, joint_models: dict[str, Any]) -> None:
    model, clip = joint_models["flux"]
    with pytest.raises(Exception, match="300 tokens"):
        _run_guide(comfy_nodes, model, _OddClip(clip))
    with pytest.raises(Exception, match="'a dog' is not in the prompt"):
        _run_guide(comfy_nodes, model, clip, highlights=H.strokes({**H.CAT_STROKE, "phrase": "a dog"}))


# ---------------------------------------------------------------------------------------- family checkpoints


def _mask_highlight(comfy_nodes: ModuleType, size: int) -> Any:
    mask = torch.zeros(1, size, size)
    mask[:, size // 2:, size // 2:] = 1.0  # bottom-right quarter
    with torch.inference_mode():
        return comfy_nodes.NODE_CLASS_MAPPINGS["NoiseQueryHighlightMask"].execute(mask=mask, phrase="a red ball").args[0]


@pytest.mark.parametrize("family, size", [("sd3", 128), ("flux", 64)])
def test_guide_on_the_stock_loaders_checkpoint(family: str, size: int, comfy_nodes: ModuleType,
                                               tiny_family_factory: Any) -> None:
    """The family checkpoint as CheckpointLoaderSimple gives it, with its tiny CLIP: the phrase's mass inside a
    quarter region at every joint block (Flux: its double- and single-stream block at full width 3072)."""
    fam = tiny_family_factory(family)
    with torch.inference_mode():
        model = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(fam.ckpt_name)[0]
    got = _measure(comfy_nodes, {family: (model, FM.tiny_clip(family))}, family, 1.0, highlights="",
                   mask_highlights=_mask_highlight(comfy_nodes, size), width=size, height=size)
    print(f"{family} checkpoint {size}px: image->phrase mass inside {[round(x, 3) for x in got['image']]}, "
          f"phrase->image {[round(x, 3) for x in got['text']]} (region {got['area']:.0%})")
    assert abs(got["area"] - 0.25) < 0.02
    assert len(got["image"]) == {"sd3": 1, "flux": 2}[family]
    assert min(got["image"]) >= 0.8 and min(got["text"]) >= 0.8


def guide_graph(fam: Any, *, seed: int = 1) -> dict[str, Any]:
    """Family checkpoint + tiny CLIP -> NoiseQueryHighlightMask (bottom-right quarter) -> HighlightScribbleGuide "10"
    -> (FluxGuidance) -> KSampler -> VAEDecode -> PreviewImage ("t3")."""
    spec = fam.spec
    size = spec.size
    g = FM.family_base(spec, fam.ckpt_name, positive=H.PROMPT, negative="")
    g["m0"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}}
    g["m1"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size // 2, "height": size // 2}}
    g["m2"] = {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0],
                                                         "x": size // 2, "y": size // 2, "operation": "add"}}
    g["m3"] = {"class_type": "NoiseQueryHighlightMask", "inputs": {"mask": ["m2", 0], "phrase": "red ball"}}
    g["10"] = {"class_type": "HighlightScribbleGuide", "inputs": {
        "model": [FM.CKPT, 0], "clip": [FM.CLIP, 0], "mask_highlights": ["m3", 0],
        **guide_inputs(highlights="", width=max(size, 64), height=max(size, 64))}}  # the canvas: only its aspect matters
    g.update(G.ksampler_image("t", seed, steps=2, cfg=spec.cfg, sampler=spec.sampler, scheduler=spec.scheduler,
                              size=size, negative=FM.NEG, model=["10", 0]))
    if spec.flux_guidance is None:
        g["t1"]["inputs"]["positive"] = ["10", 1]
    else:
        g["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["10", 1], "guidance": spec.flux_guidance}}
        g["t1"]["inputs"]["positive"] = ["11", 0]
    return g


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_guide_runs_through_ksampler_in_process(family: str, comfy_runner: comfy_harness.InProcessRunner,
                                                tiny_family_factory: Any) -> None:
    fam = tiny_family_factory(family)
    entry = comfy_runner.run(guide_graph(fam))
    assert "error" not in entry and comfy_harness.execution_error(entry) is None, entry
    image = comfy_runner.node_outputs("t2")[0]
    assert image.shape == (1, fam.spec.size, fam.spec.size, 3) and torch.isfinite(image).all()
    assert "'red ball'" in G.ui_text(entry, "10")


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_guide_over_http(family: str, comfy_server: comfy_harness.ComfyServer, tiny_family_factory: Any) -> None:
    fam = tiny_family_factory(family)
    entry = comfy_server.run(guide_graph(fam, seed=2), timeout=600)
    assert comfy_harness.execution_error(entry) is None, entry["status"]
    images = comfy_harness.output_images(entry, "t3")
    assert len(images) == 1
    png = comfy_server.get_image(images[0]["filename"], images[0].get("subfolder", ""), images[0]["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'red ball'" in "\n".join(entry["outputs"]["10"]["text"])
