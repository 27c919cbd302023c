"""HighlightScribbleGuide sampling overhead: the same KSampler run with and without the guide, side by side.

Runs a real ComfyUI in-process (the checkout at $COMFYUI_PATH or ~/ComfyUI) on the CPU (or the GPU ComfyUI finds).
UNets:
  tiny   the 1-level random SD1.5 test UNet (tests/host/comfy_harness.py); attention is a large share of it
  sd15   a full-size SD1.5 UNet (860M parameters: 4 levels, 16 transformer blocks) with random weights, built
         in memory from ComfyUI's own SD15 config (no download)
  sd3    joint attention: an MMDiT at SD3-medium width (1536, 24 heads) with --blocks joint blocks, random weights
  flux   joint attention: a Flux-dev-width model (3072, 24 heads x 128) with --blocks double- and --blocks
         single-stream blocks, random weights, cfg 1 as Flux-dev is sampled
         Both use the tiny text encoders of tests/host/family_models.py (ComfyUI's real wrappers and tokenizers,
         one-to-three layers) with T5 padded as the real models pad it (77 rows on SD3, 256 on Flux), so the joint
         sequence has the real text length. Per-block costs (attention vs MLP at the real width) are the real
         models'; the full models stack 24 (SD3-medium) or 19 + 38 (Flux) such blocks, so the per-step overhead
         ratio carries over.
For each repetition, in this order on the same seed and settings:
  plain     KSampler with CLIPTextEncode of the prompt, unpatched model
  guide     HighlightScribbleGuide (2 phrases, strength 1, guided over the whole run: the worst case)
  refocus   the guide plus refocusing on every step with --refocus-iterations iterations
and prints medians, guide/plain overhead and refocusing's cost per step and per iteration.

    .venv/bin/python bench/bench_highlight.py --unet sd15 --size 256 --steps 4 --reps 3
    .venv/bin/python bench/bench_highlight.py --unet flux --size 256 --steps 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))

import nq_highlight as H  # noqa: E402  (tests/host: the shared random-model builder)

STROKES = {"version": 1, "strokes": [
    {"phrase": "a cat", "width": 0.14, "points": [[0.12, 0.8], [0.22, 0.7], [0.34, 0.66], [0.44, 0.7]]},
    {"phrase": "a red ball", "width": 0.1, "points": [[0.72, 0.3], [0.8, 0.26], [0.84, 0.34], [0.76, 0.38]]}]}
PROMPT = "a cat and a red ball on a lawn, photo"


def full_sd15_model(tiny_model):  # type: ignore[no-untyped-def]
    """A ModelPatcher around a full-size SD1.5 UNet with seeded random weights (ComfyUI's SD15 config)."""
    import comfy.supported_models

    unet_config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                   "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_heads": 8, "num_head_channels": -1, "use_temporal_resblock": False,
                   "use_temporal_attention": False}
    return H.random_model(comfy.supported_models.SD15(unet_config), 0, tiny_model.model.get_dtype())


def joint_model(family: str, blocks: int, dtype):  # type: ignore[no-untyped-def]
    """A ModelPatcher around an SD3-medium-width MMDiT or a Flux-dev-width model with `blocks` blocks (per stream
    kind), seeded random weights, built from ComfyUI's own model classes."""
    import comfy.supported_models

    if family == "sd3":
        cfg = comfy.supported_models.SD3({
            "in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "depth": 24, "num_blocks": blocks,
            "num_patches": 36864, "pos_embed_max_size": 192, "adm_in_channels": 2048, "out_channels": 16,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 1536}}})
    else:
        cfg = comfy.supported_models.Flux({
            "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
            "depth": blocks, "depth_single_blocks": blocks, "axes_dim": [16, 56, 56], "theta": 10000,
            "qkv_bias": True, "txt_ids_dims": []})
    return H.random_model(cfg, 0, dtype)


def joint_clip(family: str):  # type: ignore[no-untyped-def]
    """family_models' tiny CLIP, with T5 padded to the real models' length (SD3 77, Flux 256)."""
    import comfy.sd
    import family_models as FM

    clip = comfy.sd.CLIP(FM._clip_target(family), embedding_directory=None,
                         tokenizer_data={"t5xxl_min_length": 77 if family == "sd3" else 256},
                         model_options={k: dict(v) for k, v in FM._TINY_TE_CONFIG.items()})
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in clip.cond_stage_model.state_dict().items()}
    dtype = next(iter(clip.cond_stage_model.parameters())).dtype
    clip.load_sd(FM._random_state_dict(shapes, 7, dtype), full_model=True)
    return clip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=["tiny", "sd15", "sd3", "flux"], default="tiny")
    ap.add_argument("--blocks", type=int, default=1, help="sd3 / flux: blocks per stream kind")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--refocus-iterations", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "highlight.json")
    args = ap.parse_args()

    import comfy_harness as H

    tmp = Path(tempfile.mkdtemp(prefix="nq_bench_highlight_"))
    ckpt = tmp / "ckpt" / "model.safetensors"
    H.make_tiny_sd15_checkpoint(ckpt)
    nodes = H.boot_inprocess(None, extra_model_dirs={"checkpoints": ckpt.parent}, custom_node_paths={"NoiseQuery": ROOT},
                             io_dir=tmp / "io")
    import comfy.model_management
    import torch

    guide = nodes.NODE_CLASS_MAPPINGS["HighlightScribbleGuide"]
    with torch.inference_mode():
        model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:2]
    if args.unet == "sd15":
        model = full_sd15_model(model)
    joint = args.unet in ("sd3", "flux")
    if joint:
        model = joint_model(args.unet, args.blocks, model.model.get_dtype())
        clip = joint_clip(args.unet)
        if args.unet == "flux":
            args.cfg = 1.0  # Flux-dev: guidance distilled, no negative pass
            args.refocus_iterations = 0  # refused on Flux (no gradient path in ComfyUI's Flux)
    common = dict(prompt=PROMPT, highlights=json.dumps(STROKES), width=args.size, height=args.size, strength=1.0,
                  start_percent=0.0, end_percent=1.0, schedule="constant", edge_softness=0.5, refocus_step_size=0.05)
    with torch.inference_mode():
        plain_cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        guided = guide.execute(model=model, clip=clip, refocus_percent=0.0, refocus_iterations=0, **common).args
        refocus = (guide.execute(model=model, clip=clip, refocus_percent=1.0,
                                 refocus_iterations=args.refocus_iterations, **common).args
                   if args.refocus_iterations > 0 else None)
    lat = {"samples": torch.zeros(1, 16 if joint else 4, args.size // 8, args.size // 8)}
    runs = {"plain": (model, plain_cond), "guide": (guided[0], guided[1])}
    if refocus is not None:
        runs["refocus"] = (refocus[0], refocus[1])

    def once(m, cond) -> float:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        with torch.inference_mode():
            nodes.common_ksampler(m, 7, args.steps, args.cfg, "euler", "normal", cond, negative, lat)
        return time.perf_counter() - t0

    for m, cond in runs.values():  # warm-up: model load, caches
        once(m, cond)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):
        for k, (m, cond) in runs.items():
            times[k].append(once(m, cond))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["guide"] / med["plain"] - 1
    per_step = (med["refocus"] - med["guide"]) / args.steps if "refocus" in med else float("nan")
    result = {
        "unet": args.unet, "blocks": args.blocks if joint else None, "size": args.size, "steps": args.steps, "cfg": args.cfg, "reps": args.reps,
        "device": str(comfy.model_management.get_torch_device()),
        "median_s": med, "all_s": times, "guide_overhead": overhead,
        "refocus_s_per_step": per_step, "refocus_s_per_iteration": per_step / max(args.refocus_iterations, 1),
        "plain_s_per_step": med["plain"] / args.steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.unet} UNet, {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, median of {args.reps}:")
    print(f"  plain   {med['plain']:.2f}s  ({med['plain'] / args.steps:.2f}s/step)")
    print(f"  guide   {med['guide']:.2f}s  overhead {overhead * 100:+.1f}%  (target <= 15%)")
    if "refocus" in med:
        print(f"  refocus {med['refocus']:.2f}s  +{per_step:.2f}s per step "
              f"({per_step / (med['plain'] / args.steps):.1f}x a plain step) "
              f"with {args.refocus_iterations} iteration(s)")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
