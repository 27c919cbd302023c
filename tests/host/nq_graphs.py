"""API-format graph pieces for the NoiseQuery nodes, shared by the in-process and the server tests.

Every builder returns plain dicts (node id -> {"class_type", "inputs"}) that can be merged into one graph.
Sizes are tiny on purpose (64x64 images, 2 steps): the tests run on a 2-core CPU.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS = 2
BIG_SEED = 2**64 - 2  # near ComfyUI's largest seed (0xffffffffffffffff)

# Nodes "1" (checkpoint), "2" (empty prompt) and "3" (negative prompt) are shared by the graphs below.
CKPT, POS, NEG = "1", "2", "3"


def base(ckpt_name: str, positive: str = "", negative: str = "") -> dict[str, Any]:
    """Checkpoint loader "1", positive prompt "2", negative prompt "3"."""
    return {
        CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        POS: {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": [CKPT, 1]}},
        NEG: {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": [CKPT, 1]}},
    }


def build(library_name: str, *, seed_start: int = 0, count: int = 3, batch_size: int = 3, steps: int = STEPS,
          cfg: float = 1.0, sampler: str = "euler", scheduler: str = "normal", clip_model: str = "none",
          thumbnail_size: int = 64, size: int = SIZE, model: list[Any] | None = None, negative: str = POS,
          **overrides: Any) -> dict[str, Any]:
    """A BuildNoiseLibrary node (positive from "2", negative from `negative`, model/vae from "1")."""
    inputs = {
        "model": model or [CKPT, 0], "vae": [CKPT, 2], "positive": [POS, 0], "negative": [negative, 0],
        "library_name": library_name, "width": size, "height": size, "seed_start": seed_start, "count": count,
        "batch_size": batch_size, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "clip_model": clip_model, "thumbnail_size": thumbnail_size,
    }
    inputs.update(overrides)
    return {"class_type": "BuildNoiseLibrary", "inputs": inputs}


def ksampler_image(prefix: str, seed: int | list[Any], *, steps: int = STEPS, cfg: float = 1.0,
                   sampler: str = "euler", scheduler: str = "normal", negative: str = POS,
                   latent: list[Any] | None = None, size: int = SIZE, width: int | None = None,
                   height: int | None = None, model: list[Any] | None = None, output: bool = True) -> dict[str, Any]:
    """Standard txt2img tail at batch size 1: <prefix>0 EmptyLatentImage, <prefix>1 KSampler, <prefix>2 VAEDecode,
    <prefix>3 PreviewImage (the output node, unless output=False)."""
    g: dict[str, Any] = {}
    if latent is None:
        g[f"{prefix}0"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width or size, "height": height or size,
                                                                        "batch_size": 1}}
        latent = [f"{prefix}0", 0]
    g[f"{prefix}1"] = {"class_type": "KSampler", "inputs": {
        "model": model or [CKPT, 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
        "scheduler": scheduler, "positive": [POS, 0], "negative": [negative, 0], "latent_image": latent,
        "denoise": 1.0}}
    g[f"{prefix}2"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}1", 0], "vae": [CKPT, 2]}}
    if output:
        g[f"{prefix}3"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}2", 0]}}
    return g


def custom_advanced_image(prefix: str, noise: list[Any], latent: list[Any], *, steps: int = STEPS, cfg: float = 1.0,
                          sampler: str = "euler", scheduler: str = "normal", negative: str = POS) -> dict[str, Any]:
    """SamplerCustomAdvanced(noise, CFGGuider, KSamplerSelect, BasicScheduler, latent) -> VAEDecode -> PreviewImage;
    the decoded IMAGE is node <prefix>5."""
    return {
        f"{prefix}1": {"class_type": "CFGGuider", "inputs": {"model": [CKPT, 0], "positive": [POS, 0],
                                                              "negative": [negative, 0], "cfg": cfg}},
        f"{prefix}2": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        f"{prefix}3": {"class_type": "BasicScheduler", "inputs": {"model": [CKPT, 0], "scheduler": scheduler,
                                                                   "steps": steps, "denoise": 1.0}},
        f"{prefix}4": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": noise, "guider": [f"{prefix}1", 0], "sampler": [f"{prefix}2", 0],
            "sigmas": [f"{prefix}3", 0], "latent_image": latent}},
        f"{prefix}5": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}4", 0], "vae": [CKPT, 2]}},
        f"{prefix}6": {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}5", 0]}},
    }


_COMMON_QUERY = {"top_k": 3, "rank_offset": 0, "diversity": 0.0, "exclude_seeds": ""}


def color_query(library: str, **overrides: Any) -> dict[str, Any]:
    """A NoiseQueryColor node; by default only a dominant colour (#FF8800) is asked for."""
    inputs: dict[str, Any] = {
        "library": library, "color": "#FF8800", "color_weight": 1.0, "brightness": -1.0, "contrast": -1.0,
        "saturation": -1.0, "colorfulness": -1.0, "sharpness": -1.0, "stats_weight": 1.0, "region": "none",
        "region_color": "", "region_lightness": -1.0, "region_weight": 1.0, "layout_weight": 1.0, **_COMMON_QUERY,
    }
    inputs.update(overrides)
    return {"class_type": "NoiseQueryColor", "inputs": inputs}


def text_query(library: str, text: str = "a red apple", **overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "library": library, "text": text, "negative_text": "", "text_weight": 1.0, "negative_weight": 0.5,
        **_COMMON_QUERY,
    }
    inputs.update(overrides)
    return {"class_type": "NoiseQueryText", "inputs": inputs}


def preview_thumbnails(node: str) -> dict[str, Any]:
    """An output node that makes query node `node` run (query nodes are not output nodes): a PreviewImage of its
    thumbnails output."""
    return {"class_type": "PreviewImage", "inputs": {"images": [node, 3]}}


def report_seeds(report: str) -> list[int]:
    """Seeds of the '#i seed N  score ...' lines of a query report, in rank order."""
    out = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("#") and parts[1] == "seed":
            out.append(int(parts[2]))
    return out


def ui_text(entry: Mapping[str, Any], node_id: str) -> str:
    """The joined ui "text" of a node in a history-like entry ('' if none)."""
    return "\n".join((entry.get("outputs", {}).get(node_id) or {}).get("text", []))


def pack_module(nodes_module: ModuleType, suffix: str) -> ModuleType:
    """The pack's own module `<pack>.<suffix>` (e.g. "nodes.sampling") as ComfyUI imported it.

    ComfyUI imports the pack under a path-derived name and its top-level `nodes` is ComfyUI's own, so the
    pack's modules are found through a registered node class instead of `import nodes.sampling`.
    """
    cls = nodes_module.NODE_CLASS_MAPPINGS["BuildNoiseLibrary"]
    lib_mod = sys.modules[cls.__module__]  # <pack>.nodes.library_nodes
    pack_root = lib_mod.__name__.rsplit(".", 2)[0]
    return sys.modules[f"{pack_root}.{suffix}"]
