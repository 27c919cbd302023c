"""Smoke tests proving the ComfyUI host harness: tiny checkpoint, in-process nodes, headless server."""
from __future__ import annotations

import logging
import math
import struct
from pathlib import Path
from types import ModuleType

import comfy_harness
import pytest
from comfy_harness import ComfyServer, InProcessRunner

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

log = logging.getLogger(__name__)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_find_comfyui_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert comfy_harness.find_comfyui() is None
    (tmp_path / "main.py").write_text("")
    (tmp_path / "comfy").mkdir()
    assert comfy_harness.find_comfyui() == tmp_path.resolve()


def test_tiny_checkpoint_detected_as_sd15(comfy_nodes: ModuleType, tiny_checkpoint: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import comfy.sd

    with caplog.at_level(logging.DEBUG):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert clip is not None
    problems = [r.getMessage() for r in caplog.records
                if ("missing" in r.getMessage().lower() or "unexpected" in r.getMessage().lower())
                # unloadable for any SD1.5 checkpoint (see comfy_harness.tiny_sd15_shapes)
                and r.getMessage() != "clip missing: ['clip_l.transformer.text_projection.weight']"]
    assert not problems, problems
    unet_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 20e6 < unet_params < 40e6


def test_tiny_checkpoint_is_deterministic(tiny_checkpoint: Path, comfy_path: Path, tmp_path: Path) -> None:
    again = comfy_harness.make_tiny_sd15_checkpoint(tmp_path / "again.safetensors", comfy_path)
    assert comfy_harness.file_sha256(again) == comfy_harness.file_sha256(tiny_checkpoint)


def test_boot_inprocess_is_idempotent(comfy_nodes: ModuleType, comfy_path: Path) -> None:
    assert comfy_harness.boot_inprocess(comfy_path) is comfy_nodes
    assert Path(comfy_nodes.__file__).resolve() == comfy_path / "nodes.py"
    for name in ("KSampler", "SamplerCustomAdvanced", "RandomNoise", comfy_harness.DUMMY_NODE_ID):
        assert name in comfy_nodes.NODE_CLASS_MAPPINGS


def test_inprocess_ksampler_txt2img(comfy_nodes: ModuleType, tiny_ckpt_name: str) -> None:
    import torch

    n = comfy_nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = n["CheckpointLoaderSimple"]().load_checkpoint(tiny_ckpt_name)
        pos = n["CLIPTextEncode"]().encode(clip, "a photo of a cat")[0]
        neg = n["CLIPTextEncode"]().encode(clip, "blurry")[0]
        latent = n["EmptyLatentImage"]().generate(64, 64, 1)[0]
        ks = n["KSampler"]()
        out1 = ks.sample(model, 123, 4, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]
        out2 = ks.sample(model, 123, 4, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]
        image = n["VAEDecode"]().decode(vae, {"samples": out1})[0]
    assert out1.shape == (1, 4, 8, 8)
    assert torch.equal(out1, out2), "same seed must give the same latent"
    assert image.shape == (1, 64, 64, 3)
    assert bool(torch.isfinite(image).all())


def test_inprocess_runner_and_dummy_pack(comfy_runner: InProcessRunner) -> None:
    echo = comfy_harness.DUMMY_NODE_ID
    ok = comfy_runner.run({"1": {"class_type": echo, "inputs": {"value": 21, "fail": False}}})
    assert ok["status"]["status_str"] == "success"
    assert ok["outputs"]["1"]["text"] == ["echo 42"]

    failed = comfy_runner.run({"1": {"class_type": echo, "inputs": {"value": 1, "fail": True}}})
    err = comfy_harness.execution_error(failed)
    assert err is not None and err["exception_type"] == "ValueError"
    assert "asked to fail" in err["exception_message"]

    invalid = comfy_runner.run({"1": {"class_type": echo, "inputs": {"value": 5000, "fail": False}}})
    assert invalid["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"


def test_server_txt2img(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    info = comfy_server.object_info("CheckpointLoaderSimple")
    assert tiny_ckpt_name in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert comfy_harness.DUMMY_NODE_ID in comfy_server.object_info(comfy_harness.DUMMY_NODE_ID)
    assert comfy_server.get_json("/nq_harness/ping") == {"pong": True}
    assert f"/extensions/{comfy_harness.DUMMY_PACK_NAME}/harness.js" in comfy_server.get_json("/extensions")

    prompt_id = comfy_server.post_prompt(comfy_harness.txt2img_graph(tiny_ckpt_name, seed=7))
    assert isinstance(prompt_id, str), prompt_id
    entry = comfy_server.wait(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "success", comfy_harness.execution_error(entry)
    images = comfy_harness.output_images(entry, "7")
    assert len(images) == 1
    assert _png_size(comfy_server.get_image(**images[0])) == (64, 64)


def test_server_reports_validation_and_execution_errors(comfy_server: ComfyServer) -> None:
    echo = comfy_harness.DUMMY_NODE_ID
    body = comfy_server.post_prompt({"1": {"class_type": echo, "inputs": {"value": 5000, "fail": False}}})
    assert isinstance(body, dict)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"

    entry = comfy_server.run({"1": {"class_type": echo, "inputs": {"value": 3, "fail": True}}})
    assert entry["status"]["status_str"] == "error"
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["node_id"] == "1" and err["node_type"] == echo
    assert "asked to fail" in err["exception_message"]

    entry = comfy_server.run({"1": {"class_type": echo, "inputs": {"value": 4, "fail": False}}})
    assert entry["outputs"]["1"]["text"] == ["echo 8"]
    assert not math.isnan(comfy_server.startup_seconds or math.nan)


def test_server_interrupt(comfy_server: ComfyServer, tiny_ckpt_name: str) -> None:
    graph = comfy_harness.txt2img_graph(tiny_ckpt_name, seed=99, steps=500, width=128, height=128, save=False)
    prompt_id = comfy_server.post_prompt(graph)
    assert isinstance(prompt_id, str), prompt_id
    comfy_server.wait_running(prompt_id)
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait(prompt_id, timeout=60)
    err = comfy_harness.execution_error(entry)
    assert err is not None and err["event"] == "execution_interrupted", entry["status"]
