"""Tiny random-weight SDXL, SD3 (MMDiT) and Flux checkpoints plus tiny text encoders, for host tests of every family."""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy_harness
from comfy_harness import PathLike

log = logging.getLogger(__name__)


FAMILIES = ("sdxl", "sd3", "flux")
TINY_FAMILY_SEED = 20260118
TINY_CLIP_NODE_ID = "NQTestTinyCLIPLoader"
FAMILY_PACK_NAME = "nq_test_families"

# Why a tiny text encoder cannot come from a stock loader: ComfyUI builds CLIP-G (32 x 1280) and T5-XXL
# (24 x 4096) from fixed config files (comfy/clip_config_bigg.json, comfy/text_encoders/t5_config_xxl.json),
# so a small state dict loads with most weights uninitialised. ComfyUI's own encoder classes do accept config
# overrides through model_options["<name>_model_config"], so the test CLIP below is ComfyUI's real SDXL / SD3 /
# Flux text-encoder wrapper and real tokenizer (the tokenizer files that ship with ComfyUI), only with one or
# two layers and tiny MLPs; the output widths (768 / 1280 / 4096) and token rows are the real ones.
_TINY_TE_CONFIG: dict[str, dict[str, Any]] = {
    # 3 CLIP layers: SDXL and SD3 read the penultimate hidden state (ComfyUI asserts |layer_idx| < layers).
    "clip_l_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
    "clip_g_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
    "t5xxl_model_config": {"num_layers": 1, "d_ff": 32, "d_kv": 8, "num_heads": 2},
}
# Real Flux pads T5 to 256 tokens and SD3 to 77; on 2 CPU cores a 3072-wide Flux block over 256 text rows costs
# seconds per step, so the tiny CLIP pads to fewer rows. The rows are still real T5 tokens of the prompt.
TINY_T5_MIN_LENGTH = 8


@dataclass(frozen=True)
class FamilySpec:
    """One tiny model family: checkpoint file, what ComfyUI detects it as, and how a workflow samples it."""

    family: str
    ckpt_name: str
    detected_as: str  # class name in comfy.supported_models
    latent_channels: int
    downscale: int  # image pixels per latent cell
    sampler: str
    scheduler: str
    cfg: float
    size: int  # test image side in pixels (64: BuildNoiseLibrary's smallest)
    flux_guidance: float | None = None  # FluxGuidance value for the positive conditioning (Flux only)
    loaders: Mapping[str, str] = field(default_factory=dict)  # output -> node class that provides it


def _spec(family: str) -> FamilySpec:
    loaders = {"MODEL": "CheckpointLoaderSimple", "VAE": "CheckpointLoaderSimple", "CLIP": TINY_CLIP_NODE_ID}
    if family == "sdxl":
        return FamilySpec("sdxl", "tiny_sdxl.safetensors", "SDXL", 4, 8, "euler", "normal", 1.0, 64, None, loaders)
    if family == "sd3":
        return FamilySpec("sd3", "tiny_sd3.safetensors", "SD3", 16, 8, "euler", "simple", 2.0, 64, None, loaders)
    if family == "flux":
        return FamilySpec("flux", "tiny_flux.safetensors", "Flux", 16, 8, "euler", "simple", 1.0, 64, 3.5, loaders)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


SPECS: dict[str, FamilySpec] = {f: _spec(f) for f in FAMILIES}


# --------------------------------------------------------------------------------------------------
# Diffusion model configs: what comfy.model_detection reports for the tiny state dicts
# --------------------------------------------------------------------------------------------------

def _unet_config(family: str) -> dict[str, Any]:
    if family == "sdxl":
        # comfy.supported_models.SDXL matches on model_channels 320, linear proj, context 2048, adm 2816 and the
        # exact per-block transformer_depth [0,0,2,2,10,10] (3 levels x 2 res blocks); channel_mult, the output
        # depths and the middle depth are free, so every level stays at 320 channels and the decoder is shallow.
        return {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "channel_mult": [1, 1, 1],
            "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
            "use_temporal_resblock": False, "use_temporal_attention": False,
        }
    if family == "sd3":
        # MMDiT: hidden size = 64 * depth, so depth 1 is a 64-wide single joint block (SD3.5-style RMS qk norm).
        return {
            "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 1, "input_size": None,
            "adm_in_channels": 2048,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64}},
            "num_patches": 1024, "pos_embed_max_size": 32, "qk_norm": "rms", "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": [],
        }
    if family == "flux":
        # Flux-dev layout: 24 heads x 128 (rope axes 16+56+56) fix hidden 3072 and mlp ratio 4; one double-stream
        # and one single-stream block, guidance embedding on (dev, not schnell).
        return {
            "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
            "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2, "in_channels": 16,
            "hidden_size": 3072, "context_in_dim": 4096, "vec_in_dim": 768, "depth": 1, "depth_single_blocks": 1,
            "guidance_embed": True, "yak_mlp": False, "txt_norm": False,
        }
    raise ValueError(f"unknown family {family!r}")


def _model_config(family: str) -> Any:
    import comfy.supported_models

    return getattr(comfy.supported_models, SPECS[family].detected_as)(_unet_config(family))


def _diffusion_class(family: str) -> Any:
    if family == "sdxl":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        return UNetModel
    if family == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
        return OpenAISignatureMMDITWrapper
    from comfy.ldm.flux.model import Flux
    return Flux


def family_shapes(family: str, comfy_path: PathLike | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Checkpoint key -> (shape, dtype) from ComfyUI's own diffusion model and TAESD classes (built on meta)."""
    comfy_harness.prepare_comfy_imports(comfy_path)
    import comfy.ops
    import comfy.taesd.taesd
    import torch

    model_config = _model_config(family)
    meta = torch.device("meta")
    with meta:
        net = _diffusion_class(family)(**model_config.unet_config, device=meta,
                                       operations=comfy.ops.disable_weight_init)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=SPECS[family].latent_channels)
    # No text-encoder keys: the checkpoint loader then returns no CLIP (see tiny_clip for the text side).
    prefixes = (("model.diffusion_model.", net), (model_config.vae_key_prefix[0], taesd))
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for prefix, module in prefixes:
        for k, v in module.state_dict().items():
            shapes[prefix + k] = (tuple(v.shape), v.dtype)
    return shapes


def _random_state_dict(shapes: Mapping[str, tuple[tuple[int, ...], Any]], seed: int, dtype: Any) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    sd: dict[str, Any] = {}
    for key in sorted(shapes):  # sorted-key order, one generator: same seed -> same weights in any process
        shape, src_dtype = shapes[key]
        t = comfy_harness._init_tensor(key, shape, gen)
        if key.endswith(("adaLN_modulation.1.weight", "modulation.lin.weight", "lin.weight")) and len(shape) == 2:
            # Random modulation weights give shift/scale/gate of size ~1 per channel: keep them small so the
            # tiny DiTs stay in a numerically sane range (the outputs are noise either way).
            t = t * 0.1
        sd[key] = t.to(dtype if src_dtype.is_floating_point else src_dtype).contiguous()
    return sd


def make_family_checkpoint(family: str, directory: PathLike, comfy_path: PathLike | None = None,
                           seed: int = TINY_FAMILY_SEED) -> Path:
    """Write <directory>/<spec.ckpt_name>: a random-weight diffusion model + TAESD VAE (fp16 safetensors) that
    comfy.sd.load_checkpoint_guess_config detects as SDXL / SD3 / Flux. Same seed -> byte-identical file.

    The checkpoint carries no text encoder (the loader's CLIP output is None); use tiny_clip / the
    NQTestTinyCLIPLoader node of the test pack for the CLIP.
    """
    import torch
    from safetensors.torch import save_file

    spec = SPECS[family]
    out = Path(directory) / spec.ckpt_name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = _random_state_dict(family_shapes(family, comfy_path), seed + FAMILIES.index(family), torch.float16)
    tmp = out.with_name(out.name + ".part")
    save_file(sd, str(tmp), metadata={"noisequery_tiny_family": f"{family}:{seed}"})
    os.replace(tmp, out)
    log.info("wrote %s (%d tensors, %.0f MB) in %.1fs", out, len(sd), out.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return out


MAKER_VERSION = 1  # bump when the makers change what they write (invalidates the cross-session cache)


def _cache_key(family: str, seed: int, comfy_path: PathLike | None) -> str:
    import hashlib

    root = comfy_harness._require_comfy_path(comfy_path)
    version_file = root / "comfyui_version.py"
    version = version_file.read_text(encoding="utf-8") if version_file.is_file() else ""
    text = repr((MAKER_VERSION, family, seed, _unet_config(family), version))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$NOISEQUERY_TINY_MODEL_CACHE or ~/.cache/noisequery/tiny_families."""
    env = os.environ.get("NOISEQUERY_TINY_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "noisequery" / "tiny_families"


def cached_family_checkpoint(family: str, comfy_path: PathLike | None = None, seed: int = TINY_FAMILY_SEED,
                             cache_dir: PathLike | None = None) -> Path:
    """The family checkpoint from a cache keyed on (maker version, family, seed, config, ComfyUI version).

    The Flux file is 1.1 GB and takes ~30 s to write on 2 cores; with several sessions on one machine, making it
    once per machine instead of once per session matters. Same key -> byte-identical file, so reuse is safe.
    """
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    d = base / _cache_key(family, seed, comfy_path)
    out = d / SPECS[family].ckpt_name
    if out.is_file():
        return out
    d.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(os.fspath(d)) / f".tmp-{os.getpid()}"
    made = make_family_checkpoint(family, tmp_dir, comfy_path, seed)
    os.replace(made, out)  # atomic: a concurrent session sees no file or the whole file
    tmp_dir.rmdir()
    return out


def link_checkpoint(src: PathLike, directory: PathLike) -> Path:
    """Put `src` into a model folder without copying 1 GB: hard link, else symlink, else copy."""
    import shutil

    dst = Path(directory) / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return dst
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dst


@dataclass(frozen=True)
class TinyFamily:
    """A tiny family model ready in a session's checkpoints folder."""

    spec: FamilySpec
    path: Path

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def ckpt_name(self) -> str:
        return self.path.name


# API-graph node ids used by family_base (same ids as nq_graphs.base, so nq_graphs.build / ksampler_image work).
CKPT, CLIP, POS, NEG = "1", "1c", "2", "3"


def family_base(spec: FamilySpec, ckpt_name: str, positive: str = "", negative: str = "") -> dict[str, Any]:
    """Checkpoint loader "1" (MODEL 0, VAE 2), tiny CLIP "1c", positive "2" (through FluxGuidance for Flux) and
    negative "3"; the node ids nq_graphs' builders expect."""
    g: dict[str, Any] = {
        CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        CLIP: {"class_type": TINY_CLIP_NODE_ID, "inputs": {"family": spec.family}},
        NEG: {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": [CLIP, 0]}},
    }
    if spec.flux_guidance is None:
        g[POS] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": [CLIP, 0]}}
    else:
        g["2t"] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": [CLIP, 0]}}
        g[POS] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2t", 0], "guidance": spec.flux_guidance}}
    return g


# --------------------------------------------------------------------------------------------------
# Tiny text encoders: ComfyUI's own family wrappers and tokenizers with tiny layer configs
# --------------------------------------------------------------------------------------------------

def _clip_target(family: str) -> Any:
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    if family == "sdxl":
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    if family == "sd3":  # SD3.5: CLIP-L + CLIP-G + T5
        return comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.sd3_clip.SD3Tokenizer,
            comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True))
    if family == "flux":
        return comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                      comfy.text_encoders.flux.flux_clip())
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@functools.cache
def tiny_clip(family: str, seed: int = TINY_FAMILY_SEED) -> Any:
    """The process's tiny CLIP for `family` (built once: ~180M parameters for Flux take seconds to fill).

    Callers treat it as ComfyUI treats a loader's output: clone before patching, never mutate."""
    return make_tiny_clip(family, seed)


def make_tiny_clip(family: str, seed: int = TINY_FAMILY_SEED) -> Any:
    """A new comfy.sd.CLIP for `family` (real wrapper + tokenizer, tiny layers), deterministic random weights."""
    import comfy.sd

    clip = comfy.sd.CLIP(_clip_target(family), embedding_directory=None,
                         tokenizer_data={"t5xxl_min_length": TINY_T5_MIN_LENGTH},
                         model_options={k: dict(v) for k, v in _TINY_TE_CONFIG.items()})
    model = clip.cond_stage_model
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    dtype = next(iter(model.parameters())).dtype
    sd = _random_state_dict(shapes, seed + 100 + FAMILIES.index(family), dtype)
    missing, unexpected = clip.load_sd(sd, full_model=True)
    if missing or unexpected:  # every key is filled: a miss would leave uninitialised memory (non-deterministic)
        raise RuntimeError(f"tiny {family} CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


_FAMILY_PACK_SOURCE = '''"""Test-only pack: NQTestTinyCLIPLoader, the tiny text encoders of tests/host/family_models.py."""
from __future__ import annotations

import sys

from comfy_api.latest import ComfyExtension, io

if {host_dir!r} not in sys.path:
    sys.path.append({host_dir!r})
import family_models  # noqa: E402  (tests/host: the same module the tests import, in-process)


class TinyCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=family_models.TINY_CLIP_NODE_ID,
            display_name="NoiseQuery Test Tiny CLIP",
            category="testing/noisequery",
            inputs=[io.Combo.Input("family", options=list(family_models.FAMILIES),
                                   tooltip="Which family's text encoder (tiny random weights).")],
            outputs=[io.Clip.Output("CLIP")],
        )

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(family_models.tiny_clip(family))


class FamilyExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyCLIPLoader]


async def comfy_entrypoint() -> FamilyExtension:
    return FamilyExtension()
'''


def write_family_pack(directory: PathLike) -> Path:
    """Create the test-only V3 pack providing NQTestTinyCLIPLoader(family) -> CLIP (tiny_clip of this module).

    The node class lives in the pack's own file (outside the repository), so tests that list the repository's
    nodes do not count it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve()
    (d / "__init__.py").write_text(
        _FAMILY_PACK_SOURCE.format(host_dir=str(here.parent)), encoding="utf-8")
    return d
