"""The NoiseQuery nodes inside a real ComfyUI, in-process: every graph goes through ComfyUI's own validator and
executor (InProcessRunner), with its caching, hidden inputs and interrupt handling.

Covered: the pack's node ids; the query nodes' seed / NOISE / LATENT / IMAGE outputs (NOISE equals KSampler's
batch-1 noise per item, and SamplerCustomAdvanced with it reproduces KSampler per item); text, colour and combined
queries; exclude_seeds; re-running after the library grows (fingerprint_inputs); the model-mismatch warning;
interrupting a build and resuming it; the ComfyUI adapter of the core's progress/cancel contract.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import numpy as np
import pytest
from comfy_harness import InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NODE_IDS = {"BuildNoiseLibrary", "NoiseQueryText", "NoiseQueryColor", "NoiseQueryLibraryInfo",
                 "HighlightScribbleGuide", "NoiseQueryHighlightMask",
                 "NoiseQuerySeedSlerp", "NoiseQuerySeedGrid", "NoiseQueryConditioningInterpolate", "NoiseQueryVariations",
                 "NoiseQueryVariantPicker", "NoiseQueryRank", "NoiseQuerySeedInfluence", "NoiseQueryRefine",
                 "NoiseQuerySeedInvariantPrompt", "NoiseQueryLoadInvariantPrompt",
                 "NoiseCLRTrainDirections", "NoiseCLRApplyDirections", "NoiseCLRNameDirections"}
PERMANENT_IDS = ("BuildNoiseLibrary", "NoiseQueryText", "NoiseQueryColor", "HighlightScribbleGuide")  # stored in users' saved workflows

COLOR_LIB = "inproc/color_96x64"  # colour-only, 96 wide x 64 high (latent 4 x 8 x 12), seeds 0..7
CLIP_LIB = "inproc/clip"  # CLIP ViT-B-32 (random weights), 64 x 64, seeds 0..7


def _ok(entry: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in entry, f"graph refused: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"{err['node_type']} failed: {err.get('exception_message')}"
    return entry


def _error(entry: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in entry, f"graph refused at validation instead of failing at run time: {entry}"
    err = comfy_harness.execution_error(entry)
    assert err is not None, "the graph should have failed"
    return err


def _cached_nodes(entry: dict[str, Any]) -> list[str]:
    for event, data in comfy_harness.status_messages(entry):
        if event == "execution_cached":
            return list(data["nodes"])
    raise AssertionError("no execution_cached message")


def _query(runner: InProcessRunner, ckpt: str, node: dict[str, Any], extra: dict[str, Any] | None = None
           ) -> tuple[dict[str, Any], list[Any]]:
    """Run one query node "20" (plus `extra` nodes); return (entry, its 6 outputs)."""
    graph = G.base(ckpt)
    graph["20"] = node
    graph["21"] = G.preview_thumbnails("20")
    graph.update(extra or {})
    entry = _ok(runner.run(graph))
    outs = runner.node_outputs("20")
    assert outs is not None and len(outs) == 6
    return entry, outs


@pytest.fixture(scope="module")
def color_library(comfy_runner: InProcessRunner, tiny_ckpt_name: str, nq_libraries_dir: Path) -> str:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(COLOR_LIB, seed_start=0, count=8, batch_size=4, width=96, height=64)
    _ok(comfy_runner.run(graph))
    return COLOR_LIB


@pytest.fixture(scope="module")
def clip_library(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_weights: Path) -> str:
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(CLIP_LIB, seed_start=0, count=8, batch_size=4, clip_model="ViT-B-32:openai")
    entry = _ok(comfy_runner.run(graph))
    assert "clip=ViT-B-32/openai" in comfy_runner.node_outputs("10")[2], entry
    return CLIP_LIB


# --------------------------------------------------------------------------------------------- loading


def test_pack_loaded_with_permanent_node_ids(comfy_nodes: ModuleType) -> None:
    """ComfyUI loaded the repo as a V3 pack (comfy_entrypoint, no NODE_CLASS_MAPPINGS) and registered exactly the
    pack's node ids."""
    from comfy_api.latest import io

    ours = {name for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items()
            if Path(inspect.getfile(cls)).resolve().is_relative_to(REPO_ROOT)}
    assert ours == PACK_NODE_IDS
    for node_id in PERMANENT_IDS:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(cls, io.ComfyNode)
        assert cls.GET_SCHEMA().node_id == node_id
    pack_init = sys.modules[G.pack_module(comfy_nodes, "nodes").__name__.rsplit(".", 1)[0]]
    assert not hasattr(pack_init, "NODE_CLASS_MAPPINGS"), "a V3 pack must not define NODE_CLASS_MAPPINGS"
    assert callable(pack_init.comfy_entrypoint)


def test_library_folders_are_the_sessions(comfy_nodes: ModuleType, nq_libraries_dir: Path, nq_clip_dir: Path,
                                          comfy_path: Path) -> None:
    import folder_paths

    assert Path(folder_paths.get_folder_paths("noise_libraries")[0]) == nq_libraries_dir.resolve()
    assert Path(folder_paths.get_folder_paths("noisequery_clip")[0]) == nq_clip_dir.resolve()
    host = G.pack_module(comfy_nodes, "nodes._host")
    assert Path(host.clip_cache_dir()) == nq_clip_dir.resolve()
    # the pack keeps the default folder in the list (after the user's)
    assert str(comfy_path / "models" / "noise_libraries") in folder_paths.get_folder_paths("noise_libraries")


# --------------------------------------------------------------------------------------------- outputs


def _colour_ranking(library_dir: Path, hex_colour: str) -> list[int]:
    """The library's seeds by brute force, best first, for a colour-only query: a single term ranks by its raw
    value, the share of the image in that colour from the stored palettes (noisequery_core.search.palette)."""
    from noisequery_core import Library
    from noisequery_core.search import color, palette

    lib = Library.open(library_dir)
    cols = palette.PaletteColumns.from_rows(np.asarray(lib.column("palette")), np.asarray(lib.column("palette_shares")))
    mass = palette.colour_share_scores(cols, color.srgb_to_lab(color.parse_hex_color(hex_colour))).astype(np.float64)
    order = sorted(range(lib.count), key=lambda r: -mass[r])
    assert all(mass[a] - mass[b] > 1e-6 for a, b in zip(order, order[1:4])), "near-ties: the order would be luck"
    return [int(lib.seeds[r]) for r in order]


def test_query_outputs_seed_noise_latent_thumbnails(comfy_nodes: ModuleType, comfy_runner: InProcessRunner,
                                                    tiny_ckpt_name: str, color_library: str,
                                                    nq_libraries_dir: Path) -> None:
    import comfy.sample
    import torch

    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(color_library, top_k=3, rank_offset=1))
    seed, noise, latent, thumbs, report, query = outs
    expected = _colour_ranking(nq_libraries_dir / color_library, "#FF8800")
    assert G.report_seeds(report) == expected[:4], report  # top_k + rank_offset hits are ranked
    assert seed == expected[1], "seed must be the hit at rank_offset"
    assert list(noise.seeds) == expected[1:4]
    assert noise.seed == expected[1]
    assert tuple(latent["samples"].shape) == (3, 4, 8, 12), "batch top_k, the library's latent size (h 64, w 96)"
    assert thumbs.shape[0] == 3 and thumbs.shape[-1] == 3
    assert float(thumbs.min()) >= 0.0 and float(thumbs.max()) <= 1.0
    assert thumbs.shape[1] < thumbs.shape[2], "thumbnails keep the 96x64 aspect"
    assert query is not None

    for k in (3, 5):  # a latent as large as the hit list, and a larger one (seeds repeat)
        got = noise.generate_noise({"samples": torch.zeros(k, 4, 8, 12)})
        assert tuple(got.shape) == (k, 4, 8, 12) and got.device.type == "cpu"
        for i in range(k):
            s = noise.seeds[i % len(noise.seeds)]
            want = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 12), s)[0]
            assert torch.equal(got[i], want), f"item {i}: noise differs from prepare_noise(seed {s})"


def test_colour_query_by_an_example_image_and_its_palette(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                                           color_library: str) -> None:
    """layout_image with palette_weight: the example's palette joins its layout (the library browser's "upload
    image"); an entry's own thumbnail finds that entry first. A prompt written before palette_weight existed (the
    input absent) still validates and ranks by the layout alone."""
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.color_query(color_library, top_k=1, rank_offset=2)  # some entry: its thumbnail is the example
    graph["22"] = G.color_query(color_library, top_k=2, color="", layout_image=["20", 3], palette_weight=1.0)
    graph["23"] = G.preview_thumbnails("22")
    old = G.color_query(color_library, top_k=2, color="", layout_image=["20", 3])
    assert "palette_weight" not in old["inputs"]
    graph["24"], graph["25"] = old, G.preview_thumbnails("24")
    _ok(comfy_runner.run(graph))
    want = comfy_runner.node_outputs("20")[0]
    seed, _, _, _, report, query = comfy_runner.node_outputs("22")
    assert seed == want and "palette" in report and "layout" in report, report
    assert query.palette and abs(sum(share for _, share in query.palette) - 1.0) < 0.1, query.palette
    seed_old, _, _, _, report_old, query_old = comfy_runner.node_outputs("24")
    assert seed_old == want and "layout" in report_old and "palette" not in report_old, report_old
    assert query_old.palette == ()


def test_noise_output_reproduces_ksampler_in_sampler_custom_advanced(
        comfy_runner: InProcessRunner, tiny_ckpt_name: str, color_library: str) -> None:
    q = G.color_query(color_library, top_k=2, rank_offset=0, color="#2040C0")
    _, outs = _query(comfy_runner, tiny_ckpt_name, q)
    seeds = list(outs[1].seeds)

    graph = G.base(tiny_ckpt_name)
    graph["20"] = q
    graph.update(G.custom_advanced_image("4", ["20", 1], ["20", 2], sampler="euler", cfg=1.0))
    for i, s in enumerate(seeds):
        graph.update(G.ksampler_image(f"5{i}", s, width=96, height=64))
    entry = _ok(comfy_runner.run(graph))
    assert "20" in _cached_nodes(entry), "the unchanged query node must come from the cache"
    batch = comfy_runner.node_outputs("45")[0]
    assert tuple(batch.shape) == (2, 64, 96, 3)
    for i, s in enumerate(seeds):
        single = comfy_runner.node_outputs(f"5{i}2")[0]
        diff = float((batch[i] - single[0]).abs().max())
        assert diff < 1e-3, f"item {i} (seed {s}) differs from KSampler's batch-1 image by {diff}"


# --------------------------------------------------------------------------------------------- queries


def test_text_query(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_library: str) -> None:
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.text_query(clip_library, "a red apple", negative_text="blue",
                                                                 top_k=4))
    seed, noise, latent, thumbs, report, _ = outs
    assert set(noise.seeds) <= set(range(8)) and len(noise.seeds) == 4 and seed == noise.seeds[0]
    assert tuple(latent["samples"].shape) == (4, 4, 8, 8)
    assert thumbs.shape[0] == 4
    assert "text:" in report and "negative_text:" in report, report


def test_colour_query_on_clip_library(comfy_runner: InProcessRunner, tiny_ckpt_name: str, clip_library: str) -> None:
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(clip_library, color="#FF0000", brightness=0.4,
                                                                  region="top", region_lightness=0.8))
    report = outs[4]
    assert "color #FF0000" in report and "brightness=0.4" in report and "top L=0.8" in report, report
    assert "text:" not in report


def test_text_and_colour_combined_through_also(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                               clip_library: str) -> None:
    colour = G.color_query(clip_library, color="#0000FF", top_k=2)
    text = G.text_query(clip_library, "a blue sky", top_k=5, also=["22", 5])
    _, outs = _query(comfy_runner, tiny_ckpt_name, text, extra={"22": colour})
    report = outs[4]
    for line in report.splitlines():
        if line.startswith("#"):
            assert "text:" in line and "color #0000FF:" in line, report
    assert len(outs[1].seeds) == 5  # the text node's own top_k


def test_text_node_with_only_a_colour_query_works_on_a_colour_library(
        comfy_runner: InProcessRunner, tiny_ckpt_name: str, color_library: str) -> None:
    text = G.text_query(color_library, "", also=["22", 5])
    _, outs = _query(comfy_runner, tiny_ckpt_name, text, extra={"22": G.color_query(color_library)})
    assert "color #FF8800" in outs[4]


def test_exclude_seeds(comfy_runner: InProcessRunner, tiny_ckpt_name: str, color_library: str,
                       clip_library: str) -> None:
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(color_library, top_k=4))
    first = list(outs[1].seeds)
    excluded = first[:2]
    _, outs = _query(comfy_runner, tiny_ckpt_name,
                     G.color_query(color_library, top_k=6, exclude_seeds=f"{excluded[0]}, {excluded[1]}"))
    again = list(outs[1].seeds)
    assert len(again) == 6 and not set(again) & set(excluded), (excluded, again)
    assert again[:2] == first[2:4], "the remaining ranking is unchanged"

    # every seed but one excluded (spaces as separators): only that one is left
    keep = 5
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.text_query(
        clip_library, "a dog", top_k=3, exclude_seeds=" ".join(str(s) for s in range(8) if s != keep)))
    assert list(outs[1].seeds) == [keep] and outs[0] == keep


def test_query_reruns_after_the_library_grows(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    name = "inproc/grows"
    build = G.base(tiny_ckpt_name)
    build["10"] = G.build(name, seed_start=0, count=4, batch_size=4)
    _ok(comfy_runner.run(build))

    q = G.color_query(name, top_k=8, color="#808080")
    entry, outs = _query(comfy_runner, tiny_ckpt_name, q)
    assert "4 entries" in outs[4] and sorted(outs[1].seeds) == [0, 1, 2, 3]
    entry, outs = _query(comfy_runner, tiny_ckpt_name, q)
    assert "20" in _cached_nodes(entry), "an unchanged library must not re-run the query"

    build["10"] = G.build(name, seed_start=4, count=8, batch_size=4)
    _ok(comfy_runner.run(build))
    entry, outs = _query(comfy_runner, tiny_ckpt_name, q)
    assert "20" not in _cached_nodes(entry), "the query must re-run after the library grew"
    assert "12 entries" in outs[4], outs[4]
    assert len(outs[1].seeds) == 8 and set(outs[1].seeds) <= set(range(12))
    assert set(outs[1].seeds) - {0, 1, 2, 3}, "new seeds can appear"


def test_text_query_on_colour_only_library_fails_clearly(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                                         color_library: str) -> None:
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.text_query(color_library, "a cat")
    graph["21"] = G.preview_thumbnails("20")
    err = _error(comfy_runner.run(graph))
    assert err["node_type"] == "NoiseQueryText"
    msg = err["exception_message"]
    assert "no CLIP features" in msg and "colour queries" in msg, msg


def test_empty_text_without_also_fails_clearly(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                               clip_library: str) -> None:
    graph = G.base(tiny_ckpt_name)
    graph["20"] = G.text_query(clip_library, "   ")
    graph["21"] = G.preview_thumbnails("20")
    err = _error(comfy_runner.run(graph))
    assert "text is empty" in err["exception_message"], err["exception_message"]


def test_library_info(comfy_runner: InProcessRunner, color_library: str) -> None:
    graph = {"1": {"class_type": "NoiseQueryLibraryInfo", "inputs": {"library": color_library, "preview_count": 3}}}
    entry = _ok(comfy_runner.run(graph))
    info, thumbs = comfy_runner.node_outputs("1")
    assert "8 entries (seeds 0..7)" in info and "clip=none" in info, info
    assert thumbs.shape[0] == 3
    assert G.ui_text(entry, "1") == info


# --------------------------------------------------------------------------------------------- model identity


@pytest.fixture(scope="module")
def tiny_lora(comfy_nodes: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A rank-4 LoRA on the tiny UNet's time_embed.2 (a tensor the pack's model fingerprint reads), listed under
    ComfyUI's "loras" folder."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_time_embed_2.lora_up.weight": torch.randn(1280, 4, generator=g) * 0.5,
               "lora_unet_time_embed_2.lora_down.weight": torch.randn(4, 1280, generator=g) * 0.5,
               "lora_unet_time_embed_2.alpha": torch.tensor(4.0)}, str(d / "nq_tiny_lora.safetensors"))
    comfy_harness.add_model_folder("loras", d)
    return "nq_tiny_lora.safetensors"


def _lora_node(lora: str) -> dict[str, Any]:
    return {"class_type": "LoraLoaderModelOnly",
            "inputs": {"model": [G.CKPT, 0], "lora_name": lora, "strength_model": 1.0}}


def _sample_once(runner: InProcessRunner, ckpt: str, lora: str | None, seed: int) -> None:
    """One 1-step KSampler run with the checkpoint's model (lora None) or with the LoRA applied. ComfyUI patches
    the LoRA into the shared model's weights in place when that model is loaded, and takes it out again when the
    plain model is loaded next: this puts the shared weights in a known state."""
    graph = G.base(ckpt)
    model = [G.CKPT, 0]
    if lora is not None:
        graph["30"] = _lora_node(lora)
        model = ["30", 0]
    graph.update(G.ksampler_image("4", seed, steps=1, model=model))
    _ok(runner.run(graph))


@pytest.fixture
def clean_weights_after(comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> Iterator[None]:
    """Leave the shared model's weights unpatched for the tests that follow."""
    yield
    _sample_once(comfy_runner, tiny_ckpt_name, None, seed=12345)


def test_model_mismatch_warning(comfy_runner: InProcessRunner, tiny_ckpt_name: str, color_library: str,
                                tiny_lora: str, clean_weights_after: None) -> None:
    warning = "differs from the one library"
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(color_library, model=[G.CKPT, 0]))
    assert warning not in outs[4], "the library's own model must not be reported as different"

    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(color_library, model=["30", 0]),
                     extra={"30": _lora_node(tiny_lora)})
    assert "warning: the connected model" in outs[4] and warning in outs[4], outs[4]
    assert color_library in outs[4]


def test_model_fingerprint_ignores_lora_weights_patched_in_place(
        comfy_runner: InProcessRunner, tiny_ckpt_name: str, color_library: str, tiny_lora: str,
        clean_weights_after: None) -> None:
    """ComfyUI patches LoRA weights into the shared model in place and leaves them there after sampling. The
    plain checkpoint is still the library's model: a query connected to it must not warn after a LoRA graph ran."""
    _sample_once(comfy_runner, tiny_ckpt_name, tiny_lora, seed=11)
    _, outs = _query(comfy_runner, tiny_ckpt_name, G.color_query(color_library, model=[G.CKPT, 0], top_k=2))
    assert "differs from the one library" not in outs[4], (
        "false model-mismatch warning for the library's own checkpoint after a LoRA-patched sampling run:\n"
        + outs[4])


def test_resume_build_with_a_lora_model(comfy_runner: InProcessRunner, tiny_ckpt_name: str, tiny_lora: str,
                                        nq_libraries_dir: Path, clean_weights_after: None) -> None:
    """Re-queueing a build through a LoRA with a larger count must continue the library (as it does without one)."""
    from noisequery_core import Library

    _sample_once(comfy_runner, tiny_ckpt_name, None, seed=12)  # start from unpatched weights, as after a restart
    graph = G.base(tiny_ckpt_name)
    graph["30"] = _lora_node(tiny_lora)
    graph["10"] = G.build("inproc/lora", seed_start=0, count=2, batch_size=2, model=["30", 0])
    _ok(comfy_runner.run(graph))
    graph["10"] = G.build("inproc/lora", seed_start=0, count=4, batch_size=2, model=["30", 0])
    entry = comfy_runner.run(graph)
    err = comfy_harness.execution_error(entry)
    assert err is None, f"re-queueing the LoRA build failed: {err['exception_message']}"
    assert Library.open(nq_libraries_dir / "inproc" / "lora").count == 4


# --------------------------------------------------------------------------------------------- interrupt


@pytest.fixture
def interrupt_after_first_batch(comfy_nodes: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make BuildNoiseLibrary's renderer raise ComfyUI's interrupt flag (as POST /interrupt does) right after it
    rendered its first batch. Yields the list of batches rendered."""
    import comfy.model_management

    library_nodes = G.pack_module(comfy_nodes, "nodes.library_nodes")
    base = library_nodes.SeedRenderer
    rendered: list[int] = []

    class InterruptingRenderer(base):  # type: ignore[misc, valid-type]
        def __call__(self, seeds: list[int]) -> Any:
            images = super().__call__(seeds)
            rendered.append(len(seeds))
            if len(rendered) == 1:
                comfy.model_management.interrupt_current_processing(True)
            return images

    monkeypatch.setattr(library_nodes, "SeedRenderer", InterruptingRenderer)
    yield rendered
    comfy.model_management.interrupt_current_processing(False)


def test_node_work_drives_the_progress_bar_text_and_interrupt(comfy_nodes: ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """nodes/_host.NodeWork, the one ComfyUI adapter of the core's progress/check_cancel contract."""
    import comfy.model_management
    import comfy.utils
    import server

    host = G.pack_module(comfy_nodes, "nodes._host")
    bar: list[tuple[Any, ...]] = []
    texts: list[tuple[str, str]] = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None, **_: bar.append((value, total, preview, node_id)))
    monkeypatch.setattr(server.PromptServer.instance, "send_progress_text",
                        lambda text, node_id, sid=None: texts.append((text, node_id)))
    work = host.NodeWork("7", 100)
    work.preview = ("JPEG", "an image", 512)
    for i in range(101):
        work.progress(i, 100, f"loss {i}")
    assert bar[-1] == (100, 100, ("JPEG", "an image", 512), "7") and len(bar) == 101
    # the text is throttled to ~50 messages per run (each is a websocket message) and always ends on the last
    assert len(texts) == 51 and texts[-1] == ("loss 100", "7")
    work.progress(5, 10)  # no message: no text
    assert len(texts) == 51

    work.check_cancel()  # not interrupted: returns
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            work.check_cancel()
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_interrupted_build_keeps_whole_batches_and_resumes(
        comfy_nodes: ModuleType, comfy_runner: InProcessRunner, tiny_ckpt_name: str, nq_libraries_dir: Path,
        interrupt_after_first_batch: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    from noisequery_core import Library, verify

    name = "inproc/interrupted"
    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build(name, seed_start=100, count=4, batch_size=2, sampler="euler_ancestral")
    entry = comfy_runner.run(graph)
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["event"] == "execution_interrupted", entry["status"]
    assert err["node_type"] == "BuildNoiseLibrary"

    path = nq_libraries_dir / "inproc" / "interrupted"
    rep = verify(path)
    assert rep.ok, rep.problems
    lib = Library.open(path)
    assert 0 < lib.count < 4 and lib.count % 2 == 0, f"{lib.count} entries: not whole batches of 2"
    assert sorted(int(s) for s in lib.seeds) == list(range(100, 100 + lib.count))
    done_before = lib.count

    monkeypatch.undo()  # the normal renderer again
    entry = _ok(comfy_runner.run(graph))
    assert "10" not in _cached_nodes(entry)
    report = comfy_runner.node_outputs("10")[2]
    assert f"{4 - done_before} new entries ({done_before} of 4 seeds were already in the library)" in report, report
    rep = verify(path)
    assert rep.ok and rep.count == 4, rep.problems
    lib = Library.open(path)
    assert sorted(int(s) for s in lib.seeds) == list(range(100, 104)), "no duplicates, nothing missing"
    # the resumed entries are the same images a fresh, uninterrupted build stores
    fresh = G.base(tiny_ckpt_name)
    fresh["10"] = G.build("inproc/uninterrupted", seed_start=100, count=4, batch_size=2, sampler="euler_ancestral")
    _ok(comfy_runner.run(fresh))
    other = Library.open(nq_libraries_dir / "inproc" / "uninterrupted")
    order_a, order_b = np.argsort(np.asarray(lib.seeds)), np.argsort(np.asarray(other.seeds))
    np.testing.assert_allclose(np.asarray(lib.column("stats"))[order_a], np.asarray(other.column("stats"))[order_b],
                               atol=1e-6)


def test_requeued_build_recreates_a_deleted_library(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                                    nq_libraries_dir: Path) -> None:
    """Re-queueing a finished build after its library folder was deleted must build it again -- not be served
    from ComfyUI's cache while the library stays missing (BuildNoiseLibrary has no fingerprint_inputs)."""
    import shutil

    from noisequery_core import Library

    graph = G.base(tiny_ckpt_name)
    graph["10"] = G.build("inproc/deleted", seed_start=0, count=2, batch_size=2, thumbnail_size=0)
    _ok(comfy_runner.run(graph))
    path = nq_libraries_dir / "inproc" / "deleted"
    assert Library.open(path).count == 2
    shutil.rmtree(path)
    entry = _ok(comfy_runner.run(graph))
    assert (path / "manifest.json").is_file(), (
        f"the re-queued build did nothing (cached nodes: {_cached_nodes(entry)}); the library is still missing")
    assert Library.open(path).count == 2
