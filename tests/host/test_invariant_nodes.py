"""Seed-invariant prompt nodes in a real ComfyUI (tiny random SD1.5): the optimisation through ComfyUI's executor
lowers the liked image's denoising loss on held-out seeds, leaves the model's weights bit-identical, resumes after an
Interrupt to the uninterrupted result, refuses bad inputs clearly; the loader round-trips and refuses another model's
file and paths outside the folder; and the example workflow runs through POST /prompt (interrupt + resume there too).

Sizes are tiny on purpose (64x64 images, latents 8x8, a few steps): the machine has 2 shared cores.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import comfy_harness
import nq_graphs as G
import nq_training as T
import pytest
from comfy_harness import InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "example_workflows" / "api" / "seed_invariant_prompt.json"
PROMPT = "a red barn in a green field"
LIKED_SEED = 5
ITERS = 8
NODE = "10"


def invariant_node(name: str, *, iterations: int = ITERS, **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "model": [G.CKPT, 0], "vae": [G.CKPT, 2], "conditioning": [G.POS, 0], "image": ["42", 0], "name": name,
        "iterations": iterations, "batch_size": 2, "learning_rate": 0.05, "prompt_weight": 0.01, "t_min": 0,
        "t_max": 999, "seed": 3, "checkpoint_every": 4, "resume": True,
    }
    inputs.update(overrides)
    return {"class_type": "NoiseQuerySeedInvariantPrompt", "inputs": inputs}


def graph(ckpt: str, node: dict[str, Any] | None = None, node_id: str = NODE) -> dict[str, Any]:
    """Checkpoint "1", prompt "2", the liked image (KSampler render of LIKED_SEED) "42", and the node under test."""
    g = G.base(ckpt, positive=PROMPT)
    g.update(G.ksampler_image("4", LIKED_SEED, output=node is None))
    if node is not None:
        g[node_id] = node
    return g


def loader_node(name: str) -> dict[str, Any]:
    return {"class_type": "NoiseQueryLoadInvariantPrompt", "inputs": {"model": [G.CKPT, 0], "embedding": name}}


@pytest.fixture(scope="module")
def emb_dir(nq_embeddings_dir: Path) -> Path:
    return nq_embeddings_dir


@pytest.fixture(scope="module")
def tuned(comfy_runner: InProcessRunner, comfy_nodes: ModuleType, tiny_ckpt_name: str, emb_dir: Path) -> dict[str, Any]:
    """Tune 'inproc/main' once: render the liked image first (loads the model), snapshot the UNet, then the run."""
    import torch

    T.ok(comfy_runner.run(graph(tiny_ckpt_name)))
    model = comfy_runner.node_outputs(G.CKPT)[0]
    before = T.weights(model)
    entry = T.ok(comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/main"))))
    assert comfy_runner.node_outputs(G.CKPT)[0] is model, "the checkpoint loader should have been served from cache"
    changed = T.changed_weights(before, model)
    outs = comfy_runner.node_outputs(NODE)
    liked = comfy_runner.node_outputs("42")[0]
    cond = comfy_runner.node_outputs(G.POS)[0]
    vae = comfy_runner.node_outputs(G.CKPT)[2]
    return {"model": model, "changed": changed, "entry": entry, "outs": outs, "liked": liked,
            "cond": cond, "vae": vae, "path": emb_dir / "inproc" / "main.safetensors", "torch": torch}


def test_held_out_loss_drops_and_model_is_unchanged(tuned: dict[str, Any], comfy_nodes: ModuleType) -> None:
    torch = tuned["torch"]
    mod, core = T.invariant_nodes(comfy_nodes), T.invariant_core(comfy_nodes)
    e = core.load_embedding(tuned["path"])
    assert e.iterations_done == ITERS and len(e.loss_history) == ITERS and e.tokens.shape == (77, 768)
    assert e.base_model["model_class"] == "SD15" and e.base_model["name"] == "tiny_sd15.safetensors"
    assert e.prompt["text"] == PROMPT and e.data["images"] == 1 and e.data["size"] == [64, 64]
    # the node's own report: held-out loss on its fixed unseen seeds
    assert e.held_out["after"] < e.held_out["before"], e.held_out
    # and an independent check on other seeds and timesteps than the node reports
    seeds, steps = [77_000_001, 77_000_002, 77_000_003], [100, 500, 900, 999]
    with torch.inference_mode():
        latent = mod.encode_liked(tuned["vae"], tuned["model"], tuned["liked"])
    with torch.inference_mode(False):
        predict, sigmas = mod.make_predict_noise(tuned["model"])
        lat = latent.clone()
        before = core.held_out_loss(lat, e.original, predict, sigmas, seeds, steps)
        after = core.held_out_loss(lat, e.tokens, predict, sigmas, seeds, steps)
    assert after < 0.97 * before, f"held-out loss did not drop: {before:.4f} -> {after:.4f}"
    # the frozen model: every UNet tensor bit-identical after the run
    assert not tuned["changed"], f"the optimisation changed the model: {tuned['changed'][:5]}"


def test_outputs_and_loader_round_trip(tuned: dict[str, Any], comfy_runner: InProcessRunner, comfy_nodes: ModuleType,
                                       tiny_ckpt_name: str) -> None:
    torch = tuned["torch"]
    cond, name, curve, report = tuned["outs"]
    e = T.invariant_core(comfy_nodes).load_embedding(tuned["path"])
    assert name == "inproc/main.safetensors"
    assert len(cond) == 1 and torch.equal(cond[0][0][0], e.tokens)
    assert not torch.equal(cond[0][0], tuned["cond"][0][0])  # tuned, not the prompt
    assert set(cond[0][1]) == set(tuned["cond"][0][1])  # the prompt's options (pooled_output) are kept
    assert tuple(curve.shape) == (1, 256, 512, 3)
    assert "held-out denoising loss" in report and "inproc/main.safetensors" in report

    g = G.base(tiny_ckpt_name)
    g["20"] = loader_node(name)
    T.ok(comfy_runner.run(g))
    loaded, text = comfy_runner.node_outputs("20")
    assert torch.equal(loaded[0][0], cond[0][0]) and PROMPT in text


def test_finished_run_is_not_rerun(tuned: dict[str, Any], comfy_runner: InProcessRunner, tiny_ckpt_name: str) -> None:
    mtime = tuned["path"].stat().st_mtime_ns
    T.ok(comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/main"), node_id="11")))  # not a cache hit
    assert "already made" in comfy_runner.node_outputs("11")[3]
    assert tuned["path"].stat().st_mtime_ns == mtime


def test_interrupted_run_resumes_to_the_uninterrupted_result(tuned: dict[str, Any], comfy_runner: InProcessRunner,
                                                             comfy_nodes: ModuleType, tiny_ckpt_name: str,
                                                             emb_dir: Path) -> None:
    torch = tuned["torch"]
    core, mod = T.invariant_core(comfy_nodes), T.invariant_nodes(comfy_nodes)
    iters = 6
    T.ok(comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/full", iterations=iters))))
    full = core.load_embedding(emb_dir / "inproc" / "full.safetensors")

    # Interrupt before iteration 3 (checkpoint_every is 4: the stop itself saves).
    with T.interrupt_at_check(mod, 4):
        entry = comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/cut", iterations=iters)))
    assert comfy_harness.execution_error(entry)["event"] == "execution_interrupted"
    ckpt = emb_dir / "inproc" / "cut.safetensors.checkpoint"
    assert core.load_embedding(ckpt).iterations_done == 3
    assert not (emb_dir / "inproc" / "cut.safetensors").exists()

    T.ok(comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/cut", iterations=iters))))  # resumes at 3
    cut = core.load_embedding(emb_dir / "inproc" / "cut.safetensors")
    assert torch.equal(cut.tokens, full.tokens)
    assert cut.loss_history == full.loss_history and cut.held_out == full.held_out

    # other settings refuse the checkpoint, with a way out
    entry = comfy_runner.run(graph(tiny_ckpt_name, invariant_node("inproc/cut", iterations=iters + 2,
                                                                  learning_rate=0.01)))
    assert "resume off" in T.run_error(entry)


@pytest.mark.parametrize("override, words", [
    ({"iterations": 0}, ["iterations", "below the minimum 1"]),
    ({"prompt_weight": float("nan")}, ["prompt_weight", "NaN"]),
    ({"learning_rate": float("inf")}, ["learning_rate"]),
    ({"name": "../outside"}, ["name", "'..'"]),
    ({"name": "/etc/passwd"}, ["name", "absolute"]),
    ({"t_min": 800, "t_max": 100}, ["t_min 800 is above t_max 100"]),
])
def test_bad_inputs_refused_at_queue_time(override: dict[str, Any], words: list[str], comfy_runner: InProcessRunner,
                                          tiny_ckpt_name: str, emb_dir: Path) -> None:
    node = invariant_node("inproc/bad")
    node["inputs"].update(override)
    text = T.refused(comfy_runner.run(graph(tiny_ckpt_name, node)))
    for w in words:
        assert w in text, text
    assert not (emb_dir / "inproc" / "bad.safetensors").exists()


def test_other_models_file_and_paths_outside_refused(tuned: dict[str, Any], comfy_runner: InProcessRunner,
                                                     comfy_nodes: ModuleType, tiny_ckpt_name: str, emb_dir: Path,
                                                     tmp_path: Path) -> None:
    core, mod = T.invariant_core(comfy_nodes), T.invariant_nodes(comfy_nodes)
    e = core.load_embedding(tuned["path"])
    e.base_model["fingerprint"] = "0123456789abcdef"
    e.base_model["name"] = "other.safetensors"
    core.save_embedding(emb_dir / "inproc" / "other_model.safetensors", e)
    g = G.base(tiny_ckpt_name)
    g["20"] = loader_node("inproc/other_model.safetensors")
    msg = T.run_error(comfy_runner.run(g))
    assert "was made on another model" in msg and "0123456789abcdef" in msg and "make a new embedding" in msg

    # a name outside the folder is not in the list ComfyUI validates against, and the resolver refuses it too
    g["20"] = loader_node("../../outside.safetensors")
    assert "outside.safetensors" in T.refused(comfy_runner.run(g))
    with pytest.raises(core.SeedInvariantError, match="not found"):
        mod.embedding_path("../../outside.safetensors")
    # a link inside the folder that points out of it is listed by ComfyUI but never read
    outside = tmp_path / "elsewhere.safetensors"
    core.save_embedding(outside, core.load_embedding(tuned["path"]))
    os.symlink(outside, emb_dir / "inproc" / "link.safetensors")
    with pytest.raises(core.SeedInvariantError, match="resolves outside"):
        mod.embedding_path("inproc/link.safetensors")
    # a file that is not an embedding (a LoRA in the wrong folder)
    from safetensors.torch import save_file

    save_file({"w": tuned["torch"].zeros(2)}, str(emb_dir / "inproc" / "lora.safetensors"))
    g["20"] = loader_node("inproc/lora.safetensors")
    assert "without NoiseQuery embedding metadata" in T.run_error(comfy_runner.run(g))


# --------------------------------------------------------------------------------------------- POST /prompt


def _example(ckpt: str, name: str, iterations: int, **overrides: Any) -> dict[str, Any]:
    g = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    for node in g.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if node["class_type"] == "NoiseQuerySeedInvariantPrompt":
            inputs.update(name=name, iterations=iterations, batch_size=1, checkpoint_every=1, **overrides)
        for key in ("width", "height"):
            if key in inputs:
                inputs[key] = G.SIZE
        if "steps" in inputs:
            inputs["steps"] = G.STEPS
    return g


def test_post_prompt_runs_the_example_and_resumes_after_interrupt(embeddings_server: Any, tiny_ckpt_name: str) -> None:
    server, emb = embeddings_server
    info = server.object_info("NoiseQuerySeedInvariantPrompt")["NoiseQuerySeedInvariantPrompt"]
    assert info["output"] == ["CONDITIONING", "STRING", "IMAGE", "STRING"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip", "").strip(), f"{name}: no tooltip"

    # the example, shrunk: liked render -> seed-invariant prompt -> a batch of seeds
    entry = T.ok(server.run(_example(tiny_ckpt_name, "server/example", 2), timeout=600))
    assert (emb / "server" / "example.safetensors").is_file()
    assert len(comfy_harness.output_images(entry)) >= 4

    # bad inputs over HTTP: refused by /prompt with the node and input named. Only the node's own branch is posted:
    # ComfyUI queues a prompt whose other outputs are valid (the liked image's preview, the original-prompt batch).
    import requests

    for override, words in (({"iterations": 0}, "input 'iterations' is 0, below the minimum 1"),
                            ({"prompt_weight": float("nan")}, "input 'prompt_weight' is NaN")):
        bad = _example(tiny_ckpt_name, "server/bad", 2)
        for unrelated in ("7", "14", "15", "16"):
            bad.pop(unrelated)
        bad["8"]["inputs"].update(override)
        # NaN as Python's json writes it (requests' json= would not send it), as urllib-based API clients post it
        body = json.dumps({"prompt": bad, "client_id": server.client_id})
        r = requests.post(f"{server.url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400 and words in r.text, r.text[:2000]
    assert not (emb / "server" / "bad.safetensors").exists()

    # interrupt through POST /interrupt once the first checkpoint is on disk, re-queue, compare with a whole run
    iters = 8
    cut = emb / "server" / "cut.safetensors"
    pid = server.post_prompt(_example(tiny_ckpt_name, "server/cut", iters))
    assert isinstance(pid, str), pid
    deadline = time.monotonic() + 300
    while not cut.with_name("cut.safetensors.checkpoint").is_file():
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    server.interrupt()
    first = server.wait(pid, timeout=300)
    err = comfy_harness.execution_error(first)
    assert err is not None and err["event"] == "execution_interrupted", "the run finished before the interrupt"
    assert not cut.exists()
    T.ok(server.run(_example(tiny_ckpt_name, "server/cut", iters), timeout=600))
    T.ok(server.run(_example(tiny_ckpt_name, "server/full", iters), timeout=600))
    from safetensors.torch import load_file

    a, b = load_file(str(cut)), load_file(str(emb / "server" / "full.safetensors"))
    assert a["tokens"].equal(b["tokens"]), "the resumed run differs from the uninterrupted one"
