"""Seed/prompt interpolation, the variation explorer and ranking inside a real ComfyUI (tiny SD1.5 checkpoint):
in-process through ComfyUI's validator and executor, and over HTTP through POST /prompt.

Covered: the interpolated NOISE is KSampler's noise at t=0/1 (tensors, and rendered images with euler through
SamplerCustomAdvanced vs KSampler); grid corners; conditioning interpolation of prompts of unequal length (77 vs
154 tokens) rendered per batch item; the explorer's headless pick, the picker's UI choices and bit-for-bit
replay of a saved history; ranking by CLIP score and by a LAION-shaped aesthetic head, with the winner's noise;
the example workflows through the server.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
from comfy_harness import ComfyServer, InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows" / "api"
NEW_NODES = ("NoiseQuerySeedSlerp", "NoiseQuerySeedGrid", "NoiseQueryConditioningInterpolate",
             "NoiseQueryVariations", "NoiseQueryVariantPicker", "NoiseQueryRank")
LONG_PROMPT = ", ".join(["a red house by a green lake under a blue sky"] * 12)  # > 75 tokens: 154-wide


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in entry, f"graph refused: {json.dumps(entry)[:3000]}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{err['node_type']} failed: {err.get('exception_message')}"
    return entry


def slerp_node(seed_a: int, seed_b: int, steps: int, t_start: float = 0.0, t_end: float = 1.0) -> dict[str, Any]:
    return {"class_type": "NoiseQuerySeedSlerp", "inputs": {
        "seed_a": seed_a, "seed_b": seed_b, "steps": steps, "t_start": t_start, "t_end": t_end,
        "width": G.SIZE, "height": G.SIZE}}


def explorer_node(seed: int, *, history: str = "", pick: int = -1, variants: int = 3, strength: float = 0.3,
                  cond_strength: float = 0.0, positive: list[Any] | None = None) -> dict[str, Any]:
    return {"class_type": "NoiseQueryVariations", "inputs": {
        "seed": seed, "positive": positive or [G.POS, 0], "variants": variants, "strength": strength,
        "cond_strength": cond_strength, "width": G.SIZE, "height": G.SIZE, "pick": pick, "history": history}}


def sca(prefix: str, noise: list[Any], latent: list[Any], positive: list[Any] | None = None,
        sampler: str = "euler") -> dict[str, Any]:
    """SamplerCustomAdvanced -> VAEDecode (<prefix>5) -> PreviewImage (<prefix>6), positive overridable."""
    g = G.custom_advanced_image(prefix, noise, latent, sampler=sampler)
    if positive is not None:
        g[f"{prefix}1"]["inputs"]["positive"] = positive
    return g


# --------------------------------------------------------------------------------------------- seeds


def test_seed_slerp_endpoints_are_ksampler_noise_and_images(comfy_runner: InProcessRunner,
                                                            tiny_ckpt_name: str) -> None:
    import comfy.sample
    import torch

    seed_a, seed_b = 11, 2**64 - 2
    graph = G.base(tiny_ckpt_name)
    graph["20"] = slerp_node(seed_a, seed_b, 3)
    graph.update(sca("4", ["20", 0], ["20", 1]))
    graph.update(G.ksampler_image("5", seed_a))
    graph.update(G.ksampler_image("6", seed_b))
    entry = _ok(comfy_runner.run(graph))
    noise, latent, report = comfy_runner.node_outputs("20")
    assert tuple(latent["samples"].shape) == (3, 4, 8, 8)
    assert "t=0.5" in report and G.ui_text(entry, "20") == report
    got = noise.generate_noise({"samples": torch.zeros(3, 4, 8, 8)})
    assert torch.equal(got[0], comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed_a)[0])
    assert torch.equal(got[2], comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed_b)[0])
    assert abs(float(got[1].std()) - 1.0) < 0.25  # 256 values only: loose; tests/core checks the statistics

    batch = comfy_runner.node_outputs("45")[0]
    for item, prefix in ((0, "5"), (2, "6")):
        single = comfy_runner.node_outputs(f"{prefix}2")[0]
        diff = float((batch[item] - single[0]).abs().max())
        assert diff < 1e-3, f"strip item {item} differs from KSampler's image by {diff}"
    mid = float((batch[1] - batch[0]).abs().max())
    assert mid > 1e-2, "the middle of the walk should differ from its start"


def test_seed_grid_corners(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    import comfy.sample
    import torch

    corners = (3, 4, 5, 6)
    graph = G.base(tiny_ckpt_name)
    graph["20"] = {"class_type": "NoiseQuerySeedGrid", "inputs": {
        "seed_top_left": corners[0], "seed_top_right": corners[1], "seed_bottom_left": corners[2],
        "seed_bottom_right": corners[3], "rows": 2, "columns": 3, "width": 96, "height": 64}}
    graph.update(sca("4", ["20", 0], ["20", 1]))
    _ok(comfy_runner.run(graph))
    noise, latent, _ = comfy_runner.node_outputs("20")
    assert tuple(latent["samples"].shape) == (6, 4, 8, 12)
    got = noise.generate_noise(latent)
    for item, s in zip((0, 2, 3, 5), corners):
        assert torch.equal(got[item], comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 12), s)[0]), item
    assert tuple(comfy_runner.node_outputs("45")[0].shape) == (6, 64, 96, 3)


# --------------------------------------------------------------------------------------------- prompts


def test_conditioning_interpolation_unequal_lengths(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    """Short (77) and long (154-token) prompts: a 3-item batch rendered with the same noise on every item; item 0
    matches KSampler with prompt A alone and item 2 with prompt B alone."""
    import torch

    seed = 21
    graph = G.base(tiny_ckpt_name, positive="a cat")
    graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": LONG_PROMPT, "clip": [G.CKPT, 1]}}
    graph["20"] = {"class_type": "NoiseQueryConditioningInterpolate", "inputs": {
        "conditioning_a": [G.POS, 0], "conditioning_b": ["7", 0], "mode": "slerp", "t_start": 0.0, "t_end": 1.0,
        "steps": 3}}
    graph["21"] = slerp_node(seed, seed, 3)  # the same seed on both ends: that seed's noise on every item
    graph.update(sca("4", ["21", 0], ["21", 1], positive=["20", 0]))
    graph.update(G.ksampler_image("5", seed))  # prompt A ("2")
    ks_b = G.ksampler_image("6", seed)
    ks_b["61"]["inputs"]["positive"] = ["7", 0]
    graph.update(ks_b)
    _ok(comfy_runner.run(graph))
    cond, report = comfy_runner.node_outputs("20")
    tokens_a = comfy_runner.node_outputs(G.POS)[0][0][0]
    tokens_b = comfy_runner.node_outputs("7")[0][0][0]
    assert tokens_a.shape[1] == 77 and tokens_b.shape[1] == 154
    assert tuple(cond[0][0].shape) == (3, 154, 768), report
    assert torch.equal(cond[0][0][0:1], tokens_a.repeat(1, 2, 1)) and torch.equal(cond[0][0][2:3], tokens_b)
    assert cond[0][1]["pooled_output"].shape[0] == 3
    batch = comfy_runner.node_outputs("45")[0]
    for item, prefix in ((0, "5"), (2, "6")):
        single = comfy_runner.node_outputs(f"{prefix}2")[0]
        diff = float((batch[item] - single[0]).abs().max())
        assert diff < 1e-3, f"prompt-walk item {item} differs from KSampler with that prompt alone by {diff}"
    assert float((batch[1] - batch[0]).abs().max()) > 1e-3


def test_conditioning_single_factor_and_extrapolation(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    import torch

    graph = G.base(tiny_ckpt_name, positive="a cat", negative="a dog")
    for nid, t, mode in (("20", 0.0, "slerp"), ("22", 1.5, "lerp")):
        graph[nid] = {"class_type": "NoiseQueryConditioningInterpolate", "inputs": {
            "conditioning_a": [G.POS, 0], "conditioning_b": [G.NEG, 0], "mode": mode, "t_start": t, "t_end": 1.0,
            "steps": 1}}
    graph.update(sca("4", ["30", 0], ["30", 1], positive=["20", 0]))
    graph.update(sca("7", ["30", 0], ["30", 1], positive=["22", 0]))
    graph["30"] = slerp_node(1, 1, 1)
    _ok(comfy_runner.run(graph))
    a = comfy_runner.node_outputs(G.POS)[0][0][0]
    b = comfy_runner.node_outputs(G.NEG)[0][0][0]
    assert torch.equal(comfy_runner.node_outputs("20")[0][0][0], a), "t=0 must be prompt A exactly"
    extra = comfy_runner.node_outputs("22")[0][0][0]
    assert torch.allclose(extra, b + 0.5 * (b - a), atol=1e-4)


# --------------------------------------------------------------------------------------------- explorer


def _explore(runner: InProcessRunner, ckpt: str, node: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Explorer "20" -> SamplerCustomAdvanced on its variants -> VAEDecode -> Variant Picker "25"."""
    graph = G.base(ckpt, positive="a lighthouse")
    graph["20"] = node
    graph.update(sca("4", ["20", 0], ["20", 2], positive=["20", 1]))
    del graph["46"]
    graph["25"] = {"class_type": "NoiseQueryVariantPicker", "inputs": {"images": ["45", 0], "exploration": ["20", 6]}}
    entry = _ok(runner.run(graph))
    return entry, runner.node_outputs("20")


def test_explorer_pick_and_bit_for_bit_replay(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    import torch

    lat = {"samples": torch.zeros(3, 4, 8, 8)}
    one = {"samples": torch.zeros(1, 4, 8, 8)}
    seed = 77
    # round 0: three variants around seed 77
    entry, outs = _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed, cond_strength=0.05))
    noise, positive, latent, current, current_pos, history, exploration = outs
    assert tuple(latent["samples"].shape) == (3, 4, 8, 8)
    assert json.loads(history)["picks"] == []
    v0 = noise.generate_noise(lat)
    import comfy.sample
    assert torch.equal(current.generate_noise(one)[0], comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed)[0])
    assert positive[0][0].shape[0] == 3 and not torch.equal(positive[0][0][0], positive[0][0][1])
    images0 = comfy_runner.node_outputs("45")[0]
    picker_ui = entry["outputs"]["25"]
    choices = picker_ui["noisequery_choices"]
    assert len(choices) == 3 and len(picker_ui["noisequery_variants"]) == 3
    assert all(img["type"] == "temp" for img in picker_ui["noisequery_variants"])

    # UI path: the picker's choice 1 written into the history widget (what web/js/noisequery_explore.js does)
    entry, outs = _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed, history=choices[1], cond_strength=0.05))
    _, _, _, current, current_pos, history, _ = outs
    assert torch.equal(current.generate_noise(one)[0], v0[1]), "the picked variant must become the current noise"
    assert torch.equal(current_pos[0][0], positive[0][0][1:2]), "and its prompt the current prompt"
    assert entry["outputs"]["20"]["noisequery_history"] == [history] == [choices[1]]
    v1 = outs[0].generate_noise(lat)
    images1 = comfy_runner.node_outputs("45")[0]

    # headless path: pick=2 on that history; the returned history replays the same state from scratch
    _, outs = _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed, history=history, pick=2, cond_strength=0.05))
    after = outs[5]
    assert [p["index"] for p in json.loads(after)["picks"]] == [1, 2]
    assert torch.equal(outs[3].generate_noise(one)[0], v1[2])
    # a saved workflow (history widget = after, pick -1, other widgets changed) replays the same noise
    _, outs = _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed, history=after, strength=0.9, variants=2,
                                                                   cond_strength=0.05))
    assert torch.equal(outs[3].generate_noise(one)[0], v1[2])
    # and the same rendered images: replaying round 1 gives round 1's images again
    _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed + 1))  # something else in between
    _explore(comfy_runner, tiny_ckpt_name, explorer_node(seed, history=choices[1], cond_strength=0.05))
    assert torch.equal(comfy_runner.node_outputs("45")[0], images1)
    assert not torch.equal(images1, images0)


def test_explorer_refuses_a_history_of_another_seed(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    _, outs = _explore(comfy_runner, tiny_ckpt_name, explorer_node(5, pick=0))
    graph = G.base(tiny_ckpt_name)
    graph["20"] = explorer_node(6, history=outs[5])
    graph.update(sca("4", ["20", 0], ["20", 2], positive=["20", 1]))
    entry = comfy_runner.run(graph)
    err = comfy_harness.execution_error(entry)
    assert err is not None and "starts from seed 5, but the seed input is 6" in err["exception_message"], entry


# --------------------------------------------------------------------------------------------- ranking


@pytest.fixture(scope="module")
def aesthetic_file(comfy_nodes: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LAION-improved-aesthetic-predictor-shaped MLP (random weights) for 512-wide ViT-B-32 embeddings."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("aesthetic")
    g = torch.Generator().manual_seed(3)
    dims = [512, 1024, 128, 64, 16, 1]
    sd = {}
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"layers.{layer}.weight"] = torch.randn(o, i, generator=g) * 0.1
        sd[f"layers.{layer}.bias"] = torch.randn(o, generator=g) * 0.1
    save_file(sd, str(d / "tiny_aesthetic.safetensors"))
    comfy_harness.add_model_folder("noisequery_aesthetic", d)
    return "tiny_aesthetic.safetensors"


def test_rank_by_clip_and_aesthetic_returns_the_winners_noise(comfy_nodes: Any, comfy_runner: InProcessRunner,
                                                               tiny_ckpt_name: str, clip_weights: Path,
                                                               aesthetic_file: str) -> None:
    import numpy as np
    import torch

    graph = G.base(tiny_ckpt_name)
    graph["20"] = slerp_node(1, 2, 4)
    graph.update(sca("4", ["20", 0], ["20", 1]))
    graph["30"] = {"class_type": "NoiseQueryRank", "inputs": {
        "images": ["45", 0], "text": "a red apple", "clip_model": "ViT-B-32:openai", "clip_weight": 1.0,
        "aesthetic_model": aesthetic_file, "aesthetic_weight": 0.5, "noise": ["20", 0]}}
    graph["31"] = {"class_type": "PreviewImage", "inputs": {"images": ["30", 0]}}
    entry = _ok(comfy_runner.run(graph))
    best_image, best_index, best_seed, best_noise, ranked, report = comfy_runner.node_outputs("30")
    images = comfy_runner.node_outputs("45")[0]
    assert 0 <= best_index < 4 and torch.equal(best_image[0], images[best_index])
    assert torch.equal(ranked[0], images[best_index]) and ranked.shape == images.shape
    assert "clip" in report and "aesthetic" in report and report.count("\n#") == 4, report
    assert G.ui_text(entry, "30") == report
    strip = comfy_runner.node_outputs("20")[0].generate_noise({"samples": torch.zeros(4, 4, 8, 8)})
    got = best_noise.generate_noise({"samples": torch.zeros(2, 4, 8, 8)})
    assert torch.equal(got[0], strip[best_index]) and torch.equal(got[1], strip[best_index])
    assert best_seed == 1  # an interpolated NOISE has no per-item seeds: its own seed

    # the ranking itself: recompute the metrics with the same models and check the order
    host = G.pack_module(comfy_nodes, "nodes._host")
    exploration_rank_nodes = G.pack_module(comfy_nodes, "nodes.exploration_rank_nodes")
    from noisequery_core import ClipSpec
    from noisequery_core.exploration.rank import clip_scores, embed_images, rank

    emb = host.embedder_for(ClipSpec.parse("ViT-B-32:openai"))
    glue = G.pack_module(comfy_nodes, "nodes._glue")
    e = embed_images(emb, glue.to_pil(images))
    clip = clip_scores(e, emb.encode_text(["a red apple"])[0])
    aest = exploration_rank_nodes.aesthetic_head(aesthetic_file)(e)
    want = rank({"clip": clip, "aesthetic": aest}, {"clip": 1.0, "aesthetic": 0.5}).order
    order = [int(np.argmin([float((ranked[r] - images[i]).abs().max()) for i in range(4)])) for r in range(4)]
    assert order == want and best_index == want[0]


def test_rank_seeds_of_query_hits(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_weights: Path,
                                  nq_libraries_dir: Path, comfy_nodes: Any) -> None:
    """A Noise Query's thumbnails + NOISE in: best_seed is the winning hit's seed, best_noise its KSampler noise.
    With the library named, its CLIP model and the hits' stored full-size embeddings rank them."""
    import comfy.sample
    import torch

    from noisequery_core import Library
    from noisequery_core.exploration.rank import clip_scores, rank

    lib = "inproc/rank_hits"
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(lib, seed_start=40, count=6, batch_size=3, clip_model="ViT-B-32:openai")
    _ok(comfy_runner.run(graph))
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.color_query(lib, top_k=4)
    rank_inputs = {"images": ["20", 3], "text": "a blue sea", "clip_model": "ViT-B-32:openai", "clip_weight": 1.0,
                   "aesthetic_model": "none", "aesthetic_weight": 1.0, "noise": ["20", 1]}
    graph["30"] = {"class_type": "NoiseQueryRank", "inputs": rank_inputs}
    graph["31"] = {"class_type": "PreviewImage", "inputs": {"images": ["30", 0]}}
    graph["32"] = {"class_type": "NoiseQueryRank", "inputs": {**rank_inputs, "library": lib}}
    graph["33"] = {"class_type": "PreviewImage", "inputs": {"images": ["32", 0]}}
    _ok(comfy_runner.run(graph))
    hits = list(comfy_runner.node_outputs("20")[1].seeds)
    _, best_index, best_seed, best_noise, _, report = comfy_runner.node_outputs("30")
    assert best_seed == hits[best_index] and f"seed {best_seed}" in report.splitlines()[2], report
    got = best_noise.generate_noise({"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.equal(got[0], comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), best_seed)[0])

    _, best_index, best_seed, _, ranked, report = comfy_runner.node_outputs("32")
    assert "stored embeddings of the hits" in report.splitlines()[0], report
    library = Library.open(nq_libraries_dir / "inproc" / "rank_hits")
    host = G.pack_module(comfy_nodes, "nodes._host")
    from noisequery_core.search.clip import spec_for_identity

    emb = host.embedder_for(spec_for_identity(library.features.clip))
    stored = library.column("clip")[library.rows_of(hits)].astype("float32")
    want = rank({"clip": clip_scores(stored, emb.encode_text(["a blue sea"])[0])}, {"clip": 1.0}).order
    assert best_index == want[0] and best_seed == hits[want[0]]
    assert [int(line.split()[2]) for line in report.splitlines()[2:6]] == want, report  # "#r image i (seed s) ..."


# --------------------------------------------------------------------------------------------- server


def adapt(graph: dict[str, Any], ckpt: str) -> dict[str, Any]:
    g = copy.deepcopy(graph)
    for node in g.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        for key in ("width", "height"):
            if key in inputs:
                inputs[key] = G.SIZE
        if "steps" in inputs and node["class_type"] == "BasicScheduler":
            inputs["steps"] = G.STEPS
    return g


def _example(name: str) -> dict[str, Any]:
    graph = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return {k: v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}


def test_object_info_of_the_new_nodes(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    for node in NEW_NODES:
        d = info[node]
        assert d["description"].strip() and d["category"] == "NoiseQuery/explore"
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                assert isinstance(spec[1], dict) and spec[1].get("tooltip", "").strip(), f"{node}.{name}: no tooltip"
        tips = d.get("output_tooltips") or []
        assert len(tips) == len(d["output"]) and all(t.strip() for t in tips), node
    assert info["NoiseQuerySeedSlerp"]["output"] == ["NOISE", "LATENT", "STRING"]
    # without an explicit False the frontend adds a "randomize" control to an INT named seed: a walk's start
    # would change after every run and the explorer would refuse its own history
    assert info["NoiseQueryVariations"]["input"]["required"]["seed"][1]["control_after_generate"] is False
    assert info["NoiseQueryVariations"]["output"][-1] == "NOISEQUERY_EXPLORATION"
    assert info["NoiseQueryVariantPicker"]["output_node"] is True
    assert "none" in info["NoiseQueryRank"]["input"]["required"]["aesthetic_model"][1]["options"]


def test_interpolation_strip_example_over_http(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    graph = adapt(_example("seed_interpolation_strip.json"), tiny_ckpt_name)
    slerp = next(k for k, v in graph.items() if v["class_type"] == "NoiseQuerySeedSlerp")
    entry = _ok(comfy_server.run(graph, timeout=240))
    steps = graph[slerp]["inputs"]["steps"]
    images = comfy_harness.output_images(entry)
    assert len(images) == steps, images
    assert "t=1" in G.ui_text(entry, slerp)


def test_explorer_example_over_http_headless_pick(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    """A headless client: run, pick variant 1 with `pick`, send the returned history back: the picker's choice 1
    of the first run is exactly that history, and the next run serves the same noise (same images)."""
    graph = adapt(_example("variation_explorer.json"), tiny_ckpt_name)
    exp = next(k for k, v in graph.items() if v["class_type"] == "NoiseQueryVariations")
    picker = next(k for k, v in graph.items() if v["class_type"] == "NoiseQueryVariantPicker")
    entry = _ok(comfy_server.run(graph, timeout=240))
    n = graph[exp]["inputs"]["variants"]
    choices = entry["outputs"][picker]["noisequery_choices"]
    assert len(choices) == n == len(entry["outputs"][picker]["noisequery_variants"])
    first = entry["outputs"][exp]["noisequery_history"][0]

    graph[exp]["inputs"].update(pick=1, history=first)
    entry = _ok(comfy_server.run(graph, timeout=240))
    history = entry["outputs"][exp]["noisequery_history"][0]
    assert history == choices[1]
    graph[exp]["inputs"].update(pick=-1, history=history)
    entry2 = _ok(comfy_server.run(graph, timeout=240))  # what a saved workflow sends after the pick
    assert entry2["outputs"][exp]["noisequery_history"][0] == history


def test_headless_walk_with_comfy_api_run(comfy_server: ComfyServer, tiny_ckpt_name: str, tmp_path: Path) -> None:
    """scripts/comfy_api_run.py as the headless client: it saves the picker's variants and prints the history,
    which goes back in with --set (kept as text although it is JSON) together with a pick."""
    import subprocess
    import sys

    def run(*sets: str) -> tuple[str, list[Path]]:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cmd = [sys.executable, str(REPO_ROOT / "scripts" / "comfy_api_run.py"), str(EXAMPLES / "variation_explorer.json"),
               "--server", comfy_server.url, "--out", str(out), "--timeout", "180",
               "--set", f"1.ckpt_name={tiny_ckpt_name}", "--set", "6.width=64", "--set", "6.height=64",
               "--set", "6.variants=3", "--set", "9.steps=2", *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(REPO_ROOT))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        line = next(x for x in proc.stdout.splitlines() if x.startswith("[6] history: "))
        return line.split(": ", 1)[1], sorted(out.glob("12_*.png"))

    first, images = run()
    assert len(images) == 3, "the picker's variants are saved"
    walked, _ = run(f"6.history={first}", "6.pick=2")
    assert [p["index"] for p in json.loads(walked)["picks"]] == [2]
    again, _ = run(f"6.history={walked}", "6.pick=0")
    assert [p["index"] for p in json.loads(again)["picks"]] == [2, 0]
