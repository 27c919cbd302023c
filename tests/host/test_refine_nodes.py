"""NoiseQueryRefine inside a real ComfyUI (tiny SD1.5 checkpoint), in-process and through POST /prompt.

Covered: the metric (a Noise Query (Colour) query's terms, scored on the renders) rises monotonically along the
walk's accepted moves and the result is never worse than the start; candidate 0 is KSampler's image; the history
replays bit for bit (the node's replay mode, a Variation Explorer, SamplerCustomAdvanced with the NOISE output);
Interrupt returns the best so far (in-process and over HTTP); bad inputs are refused with a message naming them.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import pytest
from comfy_harness import ComfyServer, InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "example_workflows" / "api" / "query_refine_ksampler.json"
LIB = "refine/tiny"
REF, QRY, BUILD = "30", "20", "10"
OUT = {"noise": 0, "latent": 1, "image": 2, "curve": 3, "history": 4, "score": 5, "report": 6}


def refine_node(seed: int | list[Any] = 0, **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "model": [G.CKPT, 0], "vae": [G.CKPT, 2], "positive": [G.POS, 0], "negative": [G.NEG, 0], "seed": seed,
        "width": G.SIZE, "height": G.SIZE, "steps": G.STEPS, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "normal", "metric": "query terms", "query_weight": 1.0, "text": "",
        "clip_model": "ViT-B-32:openai", "clip_weight": 0.0, "aesthetic_model": "none", "aesthetic_weight": 0.0,
        "budget": 13, "batch": 4, "strength": 0.5, "min_strength": 0.05, "search_seed": 0, "replay": "",
    }
    inputs.update(overrides)
    return {"class_type": "NoiseQueryRefine", "inputs": inputs}


@pytest.fixture(scope="module", autouse=True)
def inproc_library(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> str:
    """The library the in-process queries use (12 seeds, colour-only), built once: the query's combo needs it."""
    g = G.base(tiny_ckpt_name)
    g[BUILD] = G.build(LIB, count=12, batch_size=4)
    _ok(comfy_runner.run(g))
    return LIB


def query_graph(ckpt: str, **query: Any) -> dict[str, Any]:
    """Noise Query (Colour) "20" on the test library, asking for a bright, orange image."""
    g = G.base(ckpt)
    g[QRY] = G.color_query(LIB, brightness=0.8, **query)
    g["21"] = G.preview_thumbnails(QRY)
    return g


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in entry, f"graph refused: {json.dumps(entry)[:3000]}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{err['node_type']} failed: {err.get('exception_message')}"
    return entry


def _refine(runner: InProcessRunner, ckpt: str, **overrides: Any) -> tuple[dict[str, Any], list[Any]]:
    g = query_graph(ckpt)
    g[REF] = refine_node([QRY, 0], query=[QRY, 5], **overrides)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    entry = _ok(runner.run(g))
    outs = runner.node_outputs(REF)
    assert outs is not None
    return entry, outs


def _query(runner: InProcessRunner) -> Any:
    outs = runner.node_outputs(QRY)
    assert outs is not None
    return outs[0], outs[5]  # seed, Query


# --------------------------------------------------------------------------------------------- in-process


def test_refine_improves_monotonically_never_worse_and_replays(comfy_nodes: ModuleType, comfy_runner: InProcessRunner,
                                                               tiny_ckpt_name: str) -> None:
    import torch

    entry, outs = _refine(comfy_runner, tiny_ckpt_name, budget=17, query_weight=1.0)
    seed, query = _query(comfy_runner)
    noise, latent, image, curve, history, score, report = outs
    scores = json.loads(entry["outputs"][REF]["noisequery_refine_scores"][0])
    assert len(scores) == 17, report
    best_so_far = [max(scores[: i + 1]) for i in range(len(scores))]
    assert score == best_so_far[-1] >= scores[0], report
    assert "17/17 renders" in report and G.ui_text(entry, REF) == report
    assert tuple(image.shape) == (1, G.SIZE, G.SIZE, 3) and tuple(latent["samples"].shape) == (1, 4, 8, 8)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    doc = json.loads(history)
    assert doc["format"] == "noisequery.explore" and doc["start_seed"] == seed

    # Each prefix of the accepted moves, replayed by the node (no search), scores higher than the one before it.
    prefix_scores = []
    for k in range(len(doc["picks"]) + 1):
        part = json.dumps({**doc, "picks": doc["picks"][:k]}, separators=(",", ":"))
        _, routs = _refine(comfy_runner, tiny_ckpt_name, replay=part)
        prefix_scores.append(routs[OUT["score"]])
        assert "no search" in routs[OUT["report"]]
    assert prefix_scores[0] == pytest.approx(scores[0], abs=1e-6), "the empty history is the start"
    assert all(b > a for a, b in zip(prefix_scores, prefix_scores[1:])), prefix_scores
    assert prefix_scores[-1] == pytest.approx(score, abs=1e-3)

    # The full history replays the same noise bit for bit, and the same image.
    _, routs = _refine(comfy_runner, tiny_ckpt_name, replay=history, budget=64, strength=0.9, search_seed=7)
    one = {"samples": torch.zeros(1, 4, 8, 8)}
    assert torch.equal(routs[OUT["noise"]].generate_noise(one), noise.generate_noise(one))
    assert float((routs[OUT["image"]] - image).abs().max()) < 1e-3, "batch-rendered best vs its batch-1 replay"
    assert routs[OUT["history"]] == history


def test_start_is_ksampler_and_noise_output_reproduces_in_sampler_custom_advanced(
        comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    import comfy.sample
    import torch

    # budget 1: only candidate 0, which is KSampler's image for the seed
    g = G.base(tiny_ckpt_name)
    g[QRY] = G.color_query(LIB, brightness=0.8)
    g[REF] = refine_node(123, query=[QRY, 5], budget=1)
    g.update(G.ksampler_image("5", 123, negative=G.NEG))
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    _ok(comfy_runner.run(g))
    noise, latent, image, _, history, _, _ = comfy_runner.node_outputs(REF)
    assert json.loads(history)["picks"] == []
    one = torch.zeros(1, 4, 8, 8)
    assert torch.equal(noise.generate_noise({"samples": one}), comfy.sample.prepare_noise(one, 123))
    ks = comfy_runner.node_outputs("52")[0]
    assert float((ks - image).abs().max()) < 1e-3

    # a searched best: SamplerCustomAdvanced with the NOISE output and an empty latent gives the node's image, and a
    # Variation Explorer given the history stands on the same noise
    _, outs = _refine(comfy_runner, tiny_ckpt_name, budget=9)
    noise, _, image, _, history, _, _ = outs
    seed = json.loads(history)["start_seed"]
    assert json.loads(history)["picks"], "the tiny model's colour metric should improve within 9 renders"
    g = query_graph(tiny_ckpt_name)
    g[REF] = refine_node([QRY, 0], query=[QRY, 5], budget=9)
    g["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": G.SIZE, "height": G.SIZE, "batch_size": 1}}
    g.update(G.custom_advanced_image("4", [REF, 0], ["40", 0], negative=G.NEG))
    g["50"] = {"class_type": "NoiseQueryVariations", "inputs": {
        "seed": seed, "positive": [G.POS, 0], "variants": 1, "strength": 0.3, "cond_strength": 0.0,
        "width": G.SIZE, "height": G.SIZE, "pick": -1, "history": history}}
    g.update(G.custom_advanced_image("6", ["50", 3], ["40", 0], negative=G.NEG))  # the explorer's current_noise
    g["51"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    _ok(comfy_runner.run(g))
    sca = comfy_runner.node_outputs("45")[0]
    assert float((sca - image).abs().max()) < 1e-3
    current = comfy_runner.node_outputs("50")[3]
    assert torch.equal(current.generate_noise({"samples": one}), noise.generate_noise({"samples": one}))
    assert torch.equal(comfy_runner.node_outputs("65")[0], sca), "the explorer's current noise renders the same"


def test_interrupt_returns_the_best_so_far(comfy_nodes: ModuleType, comfy_runner: InProcessRunner,
                                           tiny_ckpt_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.model_management
    import torch

    mod = G.pack_module(comfy_nodes, "nodes.exploration_refine_nodes")
    base = mod.NoiseRenderer
    calls: list[int] = []

    class InterruptingRenderer(base):  # type: ignore[misc, valid-type]
        def render(self, noises: Any) -> Any:
            out = super().render(noises)
            calls.append(int(noises.shape[0]))
            if len(calls) == 3:  # the start and two rounds are done: Interrupt, as POST /interrupt does
                comfy.model_management.interrupt_current_processing(True)
            return out

    monkeypatch.setattr(mod, "NoiseRenderer", InterruptingRenderer)
    try:
        entry, outs = _refine(comfy_runner, tiny_ckpt_name, budget=200, search_seed=3)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    report = outs[OUT["report"]]
    assert "stopped by Interrupt" in report and "9/200 renders" in report, report
    scores = json.loads(entry["outputs"][REF]["noisequery_refine_scores"][0])
    assert len(scores) == 9 == sum(calls) and outs[OUT["score"]] == max(scores) >= scores[0]
    monkeypatch.setattr(mod, "NoiseRenderer", base)
    _, routs = _refine(comfy_runner, tiny_ckpt_name, replay=outs[OUT["history"]], budget=200, search_seed=3)
    one = {"samples": torch.zeros(1, 4, 8, 8)}
    assert torch.equal(routs[OUT["noise"]].generate_noise(one), outs[OUT["noise"]].generate_noise(one))


@pytest.mark.parametrize("overrides,needle", [
    ({"budget": 0}, "budget"),
    ({"strength": math.nan}, "NaN"),
    ({"query_weight": math.inf}, "infinity"),
    ({"strength": 0.2, "min_strength": 0.3}, "min_strength"),
    ({"replay": '{"format": "noisequery.explore", "version": 9, "start_seed": 0, "picks": []}'}, "version"),
])
def test_bad_inputs_refused_at_queue_time(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                          overrides: dict[str, Any], needle: str) -> None:
    g = G.base(tiny_ckpt_name)
    g[REF] = refine_node(5, metric="CLIP text", text="a cat", **overrides)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    entry = comfy_runner.run(g)
    assert "error" in entry, entry
    assert needle in json.dumps(entry["node_errors"]), entry["node_errors"]


@pytest.mark.parametrize("overrides,needle", [
    ({"metric": "CLIP text", "text": "   "}, "empty `text`"),
    ({"metric": "mix", "clip_weight": 1.0, "text": ""}, "empty `text`"),
    ({"metric": "query terms"}, "needs a query"),
    ({"metric": "aesthetic"}, "needs an aesthetic_model"),
    ({"metric": "mix", "query_weight": 0.0}, "empty"),
])
def test_bad_metrics_refused_when_run(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                      overrides: dict[str, Any], needle: str) -> None:
    g = G.base(tiny_ckpt_name)
    g[REF] = refine_node(5, **overrides)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    entry = comfy_runner.run(g)
    err = comfy_harness.execution_error(entry)
    assert err is not None and needle in err["exception_message"], entry
    assert err["node_type"] == "NoiseQueryRefine"


def test_clip_text_metric_runs(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_weights: Path) -> None:
    """Random CLIP weights: the score means nothing, the plumbing (embedder, text, raw cosine) is what is tested."""
    g = G.base(tiny_ckpt_name)
    g[REF] = refine_node(5, metric="CLIP text", text="a red apple", budget=5)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    entry = _ok(comfy_runner.run(g))
    scores = json.loads(entry["outputs"][REF]["noisequery_refine_scores"][0])
    assert len(scores) == 5 and all(-1.0 <= s <= 1.0 for s in scores)
    assert comfy_runner.node_outputs(REF)[OUT["score"]] == max(scores)


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
        if "steps" in inputs:
            inputs["steps"] = G.STEPS
        if node["class_type"] == "BuildNoiseLibrary":
            inputs.update(count=12, batch_size=4, library_name=LIB)
        if "library" in inputs:
            inputs["library"] = LIB
        if node["class_type"] == "NoiseQueryRefine":
            inputs["budget"] = 9
    return g


def _example() -> dict[str, Any]:
    graph = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    return {k: v for k, v in graph.items() if isinstance(v, dict) and "class_type" in v}


def test_object_info_of_the_refine_node(comfy_server: ComfyServer) -> None:
    d = comfy_server.object_info()["NoiseQueryRefine"]
    assert d["description"].strip() and d["category"] == "NoiseQuery/explore"
    for section in ("required", "optional"):
        for name, spec in d["input"].get(section, {}).items():
            assert isinstance(spec[1], dict) and spec[1].get("tooltip", "").strip(), f"{name}: no tooltip"
    tips = d.get("output_tooltips") or []
    assert len(tips) == len(d["output"]) and all(t.strip() for t in tips)
    assert d["output"] == ["NOISE", "LATENT", "IMAGE", "IMAGE", "STRING", "FLOAT", "STRING"]
    assert d["input"]["optional"]["query"][0] == "NOISEQUERY_QUERY"  # wires to a Noise Query's `query` output
    # no "randomize after run" on the start seed: the walk's start (and its history) would change every run
    assert d["input"]["required"]["seed"][1]["control_after_generate"] is False
    assert d["input"]["required"]["budget"][1]["min"] == 1


@pytest.fixture(scope="module")
def server_library(comfy_server: ComfyServer, tiny_ckpt_name: str) -> str:
    """The library the adapted example queries, built on the server through POST /prompt."""
    g = G.base(tiny_ckpt_name)
    g[BUILD] = G.build(LIB, count=12, batch_size=4)
    _ok(comfy_server.run(g, timeout=300))
    return LIB


def test_example_workflow_over_http_and_replay(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                               server_library: str) -> None:
    graph = adapt(_example(), tiny_ckpt_name)
    ref = next(k for k, v in graph.items() if v["class_type"] == "NoiseQueryRefine")
    assert any(v["class_type"] == "KSampler" for v in graph.values())
    entry = _ok(comfy_server.run(graph, timeout=300))
    out = entry["outputs"][ref]
    history = out["noisequery_refine_history"][0]
    scores = json.loads(out["noisequery_refine_scores"][0])
    assert len(scores) == 9 and comfy_harness.output_images(entry)
    best = max(scores)
    assert best >= scores[0]
    # the saved workflow with the history in `replay`: no search, the same best score
    graph[ref]["inputs"]["replay"] = history
    entry = _ok(comfy_server.run(graph, timeout=300))
    out = entry["outputs"][ref]
    assert out["noisequery_refine_history"][0] == history
    assert json.loads(out["noisequery_refine_scores"][0])[0] == pytest.approx(best, abs=1e-3)


def test_bad_inputs_refused_over_http(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    g = G.base(tiny_ckpt_name)
    g[REF] = refine_node(5, metric="CLIP text", text="a cat", budget=0)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    body = comfy_server.post_prompt(g)
    assert isinstance(body, dict), "a zero budget must be refused when queued"
    text = json.dumps(body)
    assert "budget" in text
    g[REF] = refine_node(5, metric="CLIP text", text="", budget=3)
    entry = comfy_server.run(g, timeout=120)
    err = comfy_harness.execution_error(entry)
    assert err is not None and "empty `text`" in err["exception_message"], entry


def _post_and_wait_for_progress(server: ComfyServer, graph: dict[str, Any], node: str, at_least: int,
                                timeout: float = 600.0) -> str:
    """POST the graph and return its prompt id once the server's websocket reported `node` at progress >= at_least
    (listening from before the post, so no message is missed)."""
    import asyncio

    import aiohttp

    async def go() -> str:
        ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            prompt_id = await asyncio.get_running_loop().run_in_executor(None, server.post_prompt, graph)
            assert isinstance(prompt_id, str), prompt_id
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                doc = json.loads(msg.data)
                data = doc.get("data") or {}
                if doc.get("type") == "progress" and data.get("node") == node and data.get("value", 0) >= at_least:
                    return prompt_id
            raise AssertionError("the websocket closed before the refine node reported progress")

    return asyncio.run(asyncio.wait_for(go(), timeout))


def test_interrupt_over_http_returns_the_best(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                             server_library: str) -> None:
    g = adapt(_example(), tiny_ckpt_name)
    ref = next(k for k, v in g.items() if v["class_type"] == "NoiseQueryRefine")
    _ok(comfy_server.run(g, timeout=300))  # everything upstream of the refine node is cached now
    g[ref]["inputs"].update(budget=4000, search_seed=11)
    prompt_id = _post_and_wait_for_progress(comfy_server, g, ref, at_least=5)  # the start and one round scored
    comfy_server.interrupt(prompt_id)
    entry = _ok(comfy_server.wait(prompt_id, timeout=300))
    out = entry["outputs"][ref]
    report = "\n".join(out["text"])
    scores = json.loads(out["noisequery_refine_scores"][0])
    assert "stopped by Interrupt" in report and 1 < len(scores) < 4000, report
    assert comfy_harness.output_images(entry), "the nodes after the refine node still ran on its best"
