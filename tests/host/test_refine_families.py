"""NoiseQueryRefine on SDXL, SD3 and Flux in a real ComfyUI (tiny random checkpoints of tests/host/family_models.py).

Per family, in-process: a colour query on a library built with that family's model feeds the refine node (stock
checkpoint loader, tiny CLIP, FluxGuidance on Flux); its candidate 0 is stock KSampler's batch-1 image and latent for
the start seed; the best score is never below the start's and every accepted move of the walk scores higher than the
one before it (each prefix of the history replayed by the node); the full history replays the best noise bit for bit;
the NOISE, LATENT and noise shapes are the family's (16 latent channels on SD3 and Flux), and SamplerCustomAdvanced
with the NOISE output renders the node's best image. On SD3 the same walk runs through POST /prompt.

The models are random, so the images are noise: these tests check that the search, its renders and its history are
the family's KSampler path, not what a metric means. Sizes are tiny (64x64, 1 step, 9 renders per walk).
"""
from __future__ import annotations

import json
from typing import Any

import comfy_harness
import family_models as FM
import nq_graphs as G
import pytest
import torch
from comfy_harness import ComfyServer, InProcessRunner
from test_refine_nodes import OUT, QRY, REF, _ok, refine_node

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REF0 = "35"
BUDGET = 9  # the start and two rounds of 4
IMAGE_ATOL = 2.0 / 255.0


def _library(spec: FM.FamilySpec) -> str:
    return f"refine_families/{spec.family}"


def _common(spec: FM.FamilySpec) -> dict[str, Any]:
    return {"sampler": spec.sampler, "scheduler": spec.scheduler, "cfg": spec.cfg, "negative": FM.NEG,
            "size": spec.size}


def _build_graph(spec: FM.FamilySpec, ckpt_name: str) -> dict[str, Any]:
    g = FM.family_base(spec, ckpt_name)
    g["10"] = G.build(_library(spec), seed_start=0, count=2, batch_size=2, steps=1, thumbnail_size=0,
                      **_common(spec))
    return g


def family_refine_node(spec: FM.FamilySpec, **overrides: Any) -> dict[str, Any]:
    """The refine node on the family's model, conditioning and sampler (family_base's node ids are nq_graphs'),
    seeded by the query's hit and scored by its terms."""
    return refine_node([QRY, 0], query=[QRY, 5], width=spec.size, height=spec.size, steps=1, cfg=spec.cfg,
                       sampler_name=spec.sampler, scheduler=spec.scheduler, **{"budget": BUDGET, **overrides})


def refine_graph(spec: FM.FamilySpec, ckpt_name: str, **overrides: Any) -> dict[str, Any]:
    """Query "20" (brightness 0.8, one term: the score is its raw value, comparable between runs) on the family's
    library -> refine "30" (previewed by "31")."""
    g = FM.family_base(spec, ckpt_name)
    g[QRY] = G.color_query(_library(spec), color="", brightness=0.8, top_k=1, model=[FM.CKPT, 0])
    g[REF] = family_refine_node(spec, **overrides)
    g["31"] = {"class_type": "PreviewImage", "inputs": {"images": [REF, 2]}}
    return g


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().clamp(0, 1) - b.float().clamp(0, 1)).abs().max())


@pytest.fixture(scope="module")
def built(comfy_runner: InProcessRunner) -> set[str]:
    """Families whose in-process library exists (built on first use: the query's combo lists it)."""
    return set()


def _ensure_library(runner: InProcessRunner, fam: FM.TinyFamily, built: set[str]) -> None:
    if fam.family not in built:
        _ok(runner.run(_build_graph(fam.spec, fam.ckpt_name)))
        built.add(fam.family)


def test_refine_on_family(tiny_family: FM.TinyFamily, comfy_runner: InProcessRunner, built: set[str]) -> None:
    spec = tiny_family.spec
    shape = (1, spec.latent_channels, spec.size // spec.downscale, spec.size // spec.downscale)
    _ensure_library(comfy_runner, tiny_family, built)

    # One graph: the walk "30"; the same start at budget 1 "35" (candidate 0 alone); stock KSampler on the start
    # seed (nodes 400..403); SamplerCustomAdvanced with the walk's NOISE on an empty latent (nodes 61..65).
    g = refine_graph(spec, tiny_family.ckpt_name)
    g[REF0] = family_refine_node(spec, budget=1)
    g["36"] = {"class_type": "PreviewImage", "inputs": {"images": [REF0, 2]}}
    g.update(G.ksampler_image("40", [QRY, 0], steps=1, **_common(spec)))
    g["60"] = {"class_type": "EmptyLatentImage", "inputs": {"width": spec.size, "height": spec.size, "batch_size": 1}}
    g.update(G.custom_advanced_image("6", [REF, 0], ["60", 0], steps=1, cfg=spec.cfg, sampler=spec.sampler,
                                     scheduler=spec.scheduler, negative=FM.NEG))
    entry = _ok(comfy_runner.run(g))
    seed = comfy_runner.node_outputs(QRY)[0]
    noise, latent, image, curve, history, score, report = comfy_runner.node_outputs(REF)

    # candidate 0 is stock KSampler at batch 1 for this family: image, latent, and the walk's first score
    _, latent0, image0, _, history0, score0, _ = comfy_runner.node_outputs(REF0)
    assert json.loads(history0)["picks"] == []
    ks_latent = comfy_runner.node_outputs("401")[0]["samples"]
    assert tuple(ks_latent.shape) == shape == tuple(latent0["samples"].shape)
    assert torch.allclose(latent0["samples"].float(), ks_latent.float(), atol=1e-4)
    assert _max_diff(image0, comfy_runner.node_outputs("402")[0]) <= IMAGE_ATOL

    # the walk: every render scored, the best never below the start, and it moved
    scores = json.loads(entry["outputs"][REF]["noisequery_refine_scores"][0])
    assert len(scores) == BUDGET and f"{BUDGET}/{BUDGET} renders" in report, report
    assert scores[0] == pytest.approx(score0, abs=1e-6), "candidate 0 of the walk is the budget-1 render"
    assert score == max(scores) >= scores[0], report
    doc = json.loads(history)
    assert doc["start_seed"] == seed and doc["picks"], f"the walk should improve within {BUDGET} renders: {report}"

    # the family's shapes: LATENT, NOISE (16 channels on SD3/Flux), IMAGE; the NOISE renders the node's best image
    assert tuple(latent["samples"].shape) == shape and tuple(image.shape) == (1, spec.size, spec.size, 3)
    made = noise.generate_noise({"samples": torch.zeros(shape)})
    assert tuple(made.shape) == shape and torch.isfinite(made).all()
    assert _max_diff(comfy_runner.node_outputs("65")[0], image) <= IMAGE_ATOL
    assert curve.shape[0] == 1

    # each accepted move scores higher than the one before it (each prefix of the history replayed, no search)
    prefix_scores = []
    for k in range(len(doc["picks"])):
        part = json.dumps({**doc, "picks": doc["picks"][:k]}, separators=(",", ":"))
        _ok(comfy_runner.run(refine_graph(spec, tiny_family.ckpt_name, replay=part)))
        prefix_scores.append(comfy_runner.node_outputs(REF)[OUT["score"]])
    assert prefix_scores[0] == pytest.approx(scores[0], abs=1e-6), "the empty history is the start"

    # the full history rebuilds the best noise bit for bit (another search_seed and budget: replay ignores them)
    _ok(comfy_runner.run(refine_graph(spec, tiny_family.ckpt_name, replay=history, budget=64, search_seed=7)))
    routs = comfy_runner.node_outputs(REF)
    prefix_scores.append(routs[OUT["score"]])
    assert all(b > a for a, b in zip(prefix_scores, prefix_scores[1:])), prefix_scores
    assert prefix_scores[-1] == pytest.approx(score, abs=1e-3)
    one = {"samples": torch.zeros(shape)}
    assert torch.equal(routs[OUT["noise"]].generate_noise(one), made)
    assert "no search" in routs[OUT["report"]] and routs[OUT["history"]] == history
    assert tuple(routs[OUT["latent"]]["samples"].shape) == shape
    assert _max_diff(routs[OUT["image"]], image) <= IMAGE_ATOL, "batch-rendered best vs its batch-1 replay"


def test_refine_on_sd3_over_http(tiny_sd3: FM.TinyFamily, comfy_server: ComfyServer) -> None:
    """POST /prompt on SD3: the walk, then its history in `replay`: the same best score and history, and a PNG of
    the family's size."""
    spec = tiny_sd3.spec
    _ok(comfy_server.run(_build_graph(spec, tiny_sd3.ckpt_name), timeout=900))
    g = refine_graph(spec, tiny_sd3.ckpt_name)
    out = _ok(comfy_server.run(g, timeout=900))["outputs"][REF]
    history = out["noisequery_refine_history"][0]
    scores = json.loads(out["noisequery_refine_scores"][0])
    assert len(scores) == BUDGET and max(scores) >= scores[0]
    assert json.loads(history)["picks"], "the SD3 walk should improve within 9 renders"
    g[REF]["inputs"]["replay"] = history
    entry = _ok(comfy_server.run(g, timeout=900))
    out = entry["outputs"][REF]
    assert out["noisequery_refine_history"][0] == history
    assert json.loads(out["noisequery_refine_scores"][0])[0] == pytest.approx(max(scores), abs=1e-3)
    images = comfy_harness.output_images(entry, "31")
    assert len(images) == 1
    import io as _io

    from PIL import Image

    assert Image.open(_io.BytesIO(comfy_server.get_image(**images[0]))).size == (spec.size, spec.size)
