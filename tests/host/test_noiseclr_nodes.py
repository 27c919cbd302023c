"""NoiseCLR nodes in a real ComfyUI (tiny random SD1.5): training through ComfyUI's executor (loss goes down, the
model's weights stay bit-identical, interrupt + resume equals an uninterrupted run), applying directions with
KSampler and SamplerCustomAdvanced (scale 0 is bit-identical to no patch, the change grows with the scale, two
directions run together in one batched UNet call per step, the step range is honoured, base-model warning), and
POST /prompt on a headless server.

Sizes are tiny on purpose (64x64 images, latents 8x8, 2-4 sampling steps): the machine has 2 shared cores.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import nq_training as T
import numpy as np
import pytest
from comfy_harness import ComfyServer, InProcessRunner
from PIL import Image, ImageDraw

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "example_workflows" / "api"
DOMAIN = "nq_noiseclr_domain"
TRAIN_ITERS = 16


def write_domain(folder: Path, count: int = 6) -> Path:
    """A synthetic image domain: a coloured disk of varying hue, size and place on a vertical gradient."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(count):
        a = np.zeros((64, 64, 3), np.uint8)
        a[..., 0] = np.linspace(30, 90, 64, dtype=np.uint8)[:, None]
        a[..., 2] = np.linspace(120, 60, 64, dtype=np.uint8)[:, None]
        im = Image.fromarray(a)
        r = int(rng.integers(10, 20))
        cx, cy = (int(v) for v in rng.integers(20, 44, 2))
        colour = tuple(int(v) for v in rng.integers(80, 255, 3))
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        im.save(folder / f"img_{i:02d}.png")
    return folder


def train_node(name: str, *, iterations: int = TRAIN_ITERS, folder: str = DOMAIN, **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "model": [G.CKPT, 0], "clip": [G.CKPT, 1], "vae": [G.CKPT, 2], "image_folder": folder, "name": name,
        "resolution": 64, "num_directions": 4, "directions_per_iteration": 3, "iterations": iterations,
        "batch_size": 3, "learning_rate": 0.05, "temperature": 0.5, "t_min": 100, "t_max": 900, "seed": 11,
        "token_count": 77, "checkpoint_every": 4, "resume": True, "names": "0=first, 1=second",
    }
    inputs.update(overrides)
    return {"class_type": "NoiseCLRTrainDirections", "inputs": inputs}


def apply_node(directions: str, slots: list[tuple[int, float, float, float]], *, model: list[Any] | None = None,
               cfg: float = 1.0) -> dict[str, Any]:
    inputs: dict[str, Any] = {"model": model or [G.CKPT, 0], "directions": directions, "cfg": cfg}
    for n in range(1, 5):
        index, scale, start, end = slots[n - 1] if n <= len(slots) else (-1, 1.0, 0.0, 1.0)
        inputs.update({f"index_{n}": index, f"scale_{n}": scale, f"start_{n}": start, f"end_{n}": end})
    return {"class_type": "NoiseCLRApplyDirections", "inputs": inputs}


@pytest.fixture(scope="module")
def domain(comfy_nodes: ModuleType) -> str:
    import folder_paths

    write_domain(Path(folder_paths.get_input_directory()) / DOMAIN)
    return DOMAIN


@pytest.fixture(scope="module")
def trained(comfy_runner: InProcessRunner, comfy_nodes: ModuleType, tiny_ckpt_name: str, domain: str,
            nq_noiseclr_dir: Path) -> dict[str, Any]:
    """Train 'inproc/main' once: iterations=0 first (loads the model), snapshot its UNet weights, then the real run."""
    import torch

    graph = G.base(tiny_ckpt_name)
    graph["10"] = train_node("inproc/zero", iterations=0)
    T.ok(comfy_runner.run(graph))
    model = comfy_runner.node_outputs(G.CKPT)[0]
    before = T.weights(model)

    graph["10"] = train_node("inproc/main")
    entry = T.ok(comfy_runner.run(graph))
    assert comfy_runner.node_outputs(G.CKPT)[0] is model, "the checkpoint loader should have been served from cache"
    changed = T.changed_weights(before, model)
    outs = comfy_runner.node_outputs("10")

    # The contrastive loss of the initial and of the trained directions on the same 8 training batches.
    mod, core = T.noiseclr_runtime(comfy_nodes), T.noiseclr_core(comfy_nodes)
    clip, vae = comfy_runner.node_outputs(G.CKPT)[1:3]
    init = core.load_directions(nq_noiseclr_dir / "inproc/zero.safetensors")
    final = core.load_directions(nq_noiseclr_dir / outs[0])
    arrays, _ = mod.gather_images(DOMAIN, None, 64)
    with torch.inference_mode():
        encoded = mod.encode_images(vae, model, arrays)
    with torch.inference_mode(False):
        predict, sigmas = mod.make_predict_noise(model)
        latents = encoded.clone()
        evals = [core.evaluate_loss(latents, final.empty, predict, sigmas, final.settings, d.directions, range(8))
                 for d in (init, final)]
    return {"model": model, "changed": changed, "entry": entry, "outs": outs, "evals": evals,
            "init": init, "final": final, "file": outs[0], "path": nq_noiseclr_dir / outs[0], "torch": torch}


def test_training_loss_decreases_and_model_is_unchanged(trained: dict[str, Any], comfy_nodes: ModuleType) -> None:
    torch = trained["torch"]
    assert trained["file"] == "inproc/main.safetensors" and trained["path"].is_file()
    d = T.noiseclr_core(comfy_nodes).load_directions(trained["path"])
    assert d.directions.shape == (4, 77, 768) and d.iterations_done == TRAIN_ITERS
    assert d.names[:2] == ["first", "second"]
    assert d.base_model["model_class"] == "SD15" and d.base_model["name"] == "tiny_sd15.safetensors"
    assert d.data["images"] == 6 and d.settings.learning_rate == 0.05
    # the initial directions (iterations 0) are the empty prompt plus a little noise
    init = trained["init"]
    assert init.iterations_done == 0 and not torch.equal(init.directions, d.directions)
    spread = float((init.directions - d.empty.unsqueeze(0)).std()) / float(d.empty.std())
    assert 0.045 < spread < 0.055, spread  # init_noise 0.05 of the empty prompt's spread
    before_loss, after_loss = trained["evals"]
    assert after_loss < 0.8 * before_loss, f"loss on fixed batches did not go down: {before_loss:.4f} -> {after_loss:.4f}"
    assert len(d.loss_history) == TRAIN_ITERS
    # the frozen model: every UNet tensor bit-identical after training
    assert not trained["changed"], f"training changed the model: {trained['changed'][:5]}"
    curve, report = trained["outs"][1], trained["outs"][2]
    assert tuple(curve.shape) == (1, 256, 512, 3) and "loss" in report and "inproc/main.safetensors" in report


def test_finished_run_is_not_retrained(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                       trained: dict[str, Any]) -> None:
    mtime = trained["path"].stat().st_mtime_ns
    graph = G.base(tiny_ckpt_name)
    graph["10"] = train_node("inproc/main")
    T.ok(comfy_runner.run(graph))
    assert "already trained" in comfy_runner.node_outputs("10")[2]
    assert trained["path"].stat().st_mtime_ns == mtime


def test_interrupted_training_resumes_to_the_uninterrupted_result(comfy_runner: InProcessRunner,
                                                                  comfy_nodes: ModuleType, tiny_ckpt_name: str,
                                                                  domain: str, nq_noiseclr_dir: Path) -> None:
    import torch

    iters = 6
    graph = G.base(tiny_ckpt_name)
    graph["10"] = train_node("inproc/full", iterations=iters)
    T.ok(comfy_runner.run(graph))
    full = T.noiseclr_core(comfy_nodes).load_directions(nq_noiseclr_dir / "inproc/full.safetensors")

    # Interrupt at iteration 3 (checkpoint_every is 4: the stop itself saves).
    with T.interrupt_at_check(T.noiseclr_runtime(comfy_nodes), 4):
        graph["10"] = train_node("inproc/cut", iterations=iters)
        entry = comfy_runner.run(graph)
    assert comfy_harness.execution_error(entry)["event"] == "execution_interrupted"
    ckpt = nq_noiseclr_dir / "inproc/cut.safetensors.checkpoint"
    assert T.noiseclr_core(comfy_nodes).load_directions(ckpt).iterations_done == 3
    assert not (nq_noiseclr_dir / "inproc/cut.safetensors").exists()

    T.ok(comfy_runner.run(graph))  # re-queued: resumes at 3
    cut = T.noiseclr_core(comfy_nodes).load_directions(nq_noiseclr_dir / "inproc/cut.safetensors")
    assert torch.equal(cut.directions, full.directions)
    assert cut.loss_history == full.loss_history

    # changed settings refuse the checkpoint with a way out
    graph["10"] = train_node("inproc/cut", iterations=iters + 2, temperature=0.25)
    assert "resume off" in T.run_error(comfy_runner.run(graph))


def _sample(runner: InProcessRunner, ckpt: str, directions: str | None, slots: list[tuple[int, float, float, float]],
            *, steps: int = 2, seed: int = 3) -> Any:
    """KSampler (empty prompt, cfg 1) latent, with the model from NoiseCLRApplyDirections when directions is set."""
    graph = G.base(ckpt)
    model = [G.CKPT, 0]
    if directions is not None:
        graph["30"] = apply_node(directions, slots)
        model = ["30", 0]
    graph.update(G.ksampler_image("4", seed, steps=steps, model=model))
    T.ok(runner.run(graph))
    return runner.node_outputs("41")[0]["samples"].clone()


def test_scale_zero_is_bit_identical_and_change_grows_with_scale(comfy_runner: InProcessRunner, tiny_ckpt_name: str,
                                                                 trained: dict[str, Any]) -> None:
    torch = trained["torch"]
    f = trained["file"]
    plain = _sample(comfy_runner, tiny_ckpt_name, None, [])
    zero = _sample(comfy_runner, tiny_ckpt_name, f, [(0, 0.0, 0.0, 1.0), (1, 0.0, 0.0, 1.0)])
    assert torch.equal(zero, plain)
    off = _sample(comfy_runner, tiny_ckpt_name, f, [])
    assert torch.equal(off, plain)
    changes = [float((_sample(comfy_runner, tiny_ckpt_name, f, [(0, s, 0.0, 1.0)]) - plain).norm())
               for s in (0.5, 1.0, 2.0)]
    assert 0 < changes[0] < changes[1] < changes[2], changes
    neg = float((_sample(comfy_runner, tiny_ckpt_name, f, [(0, -1.0, 0.0, 1.0)]) - plain).norm())
    assert neg > 0


def test_two_directions_in_one_batched_call(comfy_runner: InProcessRunner, comfy_nodes: ModuleType,
                                            tiny_ckpt_name: str, trained: dict[str, Any]) -> None:
    import comfy.samplers

    torch = trained["torch"]
    f = trained["file"]
    plain = _sample(comfy_runner, tiny_ckpt_name, None, [])
    only0 = _sample(comfy_runner, tiny_ckpt_name, f, [(0, 1.0, 0.0, 1.0)])
    only1 = _sample(comfy_runner, tiny_ckpt_name, f, [(1, 1.0, 0.0, 1.0)])
    real = comfy.samplers.calc_cond_batch
    calls: list[int] = []

    def recording(model: Any, conds: list[Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(conds))
        return real(model, conds, *args, **kwargs)

    comfy.samplers.calc_cond_batch = recording
    try:
        both = _sample(comfy_runner, tiny_ckpt_name, f, [(0, 1.0, 0.0, 1.0), (1, 1.0, 0.0, 1.0)])
        ranged = _sample(comfy_runner, tiny_ckpt_name, f, [(0, 1.0, 0.0, 0.3), (1, 1.0, 0.0, 1.0)], steps=4)
    finally:
        comfy.samplers.calc_cond_batch = real
    # per step: the sampler's own call (cond; uncond skipped at cfg 1) and ONE call for ∅ + both directions
    assert calls[:4] == [2, 3, 2, 3], calls
    # 4 steps, direction 0 acts only in the first 30% of sampling: 3 conds at first, then 2 (∅ + direction 1)
    ranged_calls = calls[4:]
    assert ranged_calls[1::2][0] == 3 and ranged_calls[1::2][-1] == 2, ranged_calls
    assert not torch.equal(both, only0) and not torch.equal(both, only1) and not torch.equal(both, plain)
    assert ranged.shape == both.shape


def test_guider_matches_ksampler_and_warns_on_other_model(comfy_runner: InProcessRunner, comfy_nodes: ModuleType,
                                                          tiny_ckpt_name: str, trained: dict[str, Any],
                                                          nq_noiseclr_dir: Path) -> None:
    torch = trained["torch"]
    f = trained["file"]
    slots = [(0, 1.5, 0.0, 1.0), (2, -1.0, 0.0, 0.5)]
    via_ksampler = _sample(comfy_runner, tiny_ckpt_name, f, slots)
    graph = G.base(tiny_ckpt_name)
    graph["30"] = apply_node(f, slots)
    graph["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    graph["41"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    graph["42"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["43"] = {"class_type": "BasicScheduler", "inputs": {"model": [G.CKPT, 0], "scheduler": "normal", "steps": 2,
                                                             "denoise": 1.0}}
    graph["44"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["41", 0], "guider": ["30", 1],
                                                                     "sampler": ["42", 0], "sigmas": ["43", 0],
                                                                     "latent_image": ["40", 0]}}
    graph["45"] = {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": [G.CKPT, 2]}}
    graph["46"] = {"class_type": "PreviewImage", "inputs": {"images": ["45", 0]}}
    T.ok(comfy_runner.run(graph))
    via_guider = comfy_runner.node_outputs("44")[0]["samples"]
    assert torch.allclose(via_guider, via_ksampler, atol=1e-4), float((via_guider - via_ksampler).abs().max())
    report = comfy_runner.node_outputs("30")[2]
    assert "#0 first: scale +1.50" in report and "warning" not in report

    # the same directions marked as trained on another model: still applied, with a warning
    core = T.noiseclr_core(comfy_nodes)
    d = core.load_directions(trained["path"])
    d.base_model["fingerprint"] = "0123456789abcdef"
    core.save_directions(nq_noiseclr_dir / "inproc/other_model.safetensors", d)
    graph["30"] = apply_node("inproc/other_model.safetensors", slots)
    T.ok(comfy_runner.run(graph))
    assert "warning: these directions were trained on SD15" in comfy_runner.node_outputs("30")[2]

    graph["30"] = apply_node(f, [(9, 1.0, 0.0, 1.0)])
    assert "direction 9 does not exist; the file has directions 0..3" in T.run_error(comfy_runner.run(graph))


def test_post_prompt_trains_and_applies(comfy_server: ComfyServer, tiny_ckpt_name: str,
                                        server_noiseclr_dir: Path) -> None:
    assert comfy_server.workdir is not None
    write_domain(comfy_server.workdir / "input" / "faces")
    train = json.loads((EXAMPLES / "noiseclr_train.json").read_text(encoding="utf-8"))
    apply = json.loads((EXAMPLES / "noiseclr_apply.json").read_text(encoding="utf-8"))
    for g in (train, apply):
        for node in g.values():
            inputs = node["inputs"]
            if node["class_type"] == "CheckpointLoaderSimple":
                inputs["ckpt_name"] = tiny_ckpt_name
            if node["class_type"] == "NoiseCLRTrainDirections":
                inputs.update(image_folder="faces", resolution=64, iterations=3, batch_size=2,
                              directions_per_iteration=2, num_directions=4, checkpoint_every=2, name="server/faces")
            if node["class_type"] == "NoiseCLRApplyDirections":
                inputs["directions"] = "server/faces.safetensors"
            for key in ("width", "height"):
                if key in inputs:
                    inputs[key] = 64
            if "steps" in inputs:
                inputs["steps"] = 2
    T.ok(comfy_server.run(train, timeout=300))
    assert (server_noiseclr_dir / "server" / "faces.safetensors").is_file()
    info = comfy_server.object_info("NoiseCLRApplyDirections")["NoiseCLRApplyDirections"]
    assert "server/faces.safetensors" in info["input"]["required"]["directions"][1]["options"]
    assert info["input"]["required"]["scale_1"][1]["display"] == "slider"
    entry = T.ok(comfy_server.run(apply, timeout=300))
    images = comfy_harness.output_images(entry)
    assert images, entry["outputs"]


def test_name_directions_node(comfy_runner: InProcessRunner, comfy_nodes: ModuleType, trained: dict[str, Any],
                              nq_noiseclr_dir: Path) -> None:
    import shutil

    shutil.copy(trained["path"], nq_noiseclr_dir / "inproc/named.safetensors")
    graph = {"50": {"class_type": "NoiseCLRNameDirections",
                    "inputs": {"directions": "inproc/named.safetensors", "names": "2=brighter, 3=bigger"}}}
    T.ok(comfy_runner.run(graph))
    assert comfy_runner.node_outputs("50")[0].splitlines() == ["#0 first", "#1 second", "#2 brighter", "#3 bigger"]
    assert T.noiseclr_core(comfy_nodes).load_directions(nq_noiseclr_dir / "inproc/named.safetensors").names[2] == "brighter"
    graph["50"]["inputs"]["names"] = "2=brighter, bigger"
    refused = comfy_runner.run(graph)
    assert "error" in refused and "index=name" in json.dumps(refused["node_errors"])
