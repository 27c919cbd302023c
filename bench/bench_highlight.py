"""HighlightScribbleGuide sampling overhead: the same KSampler run with and without the guide, side by side.

Runs a real ComfyUI in-process (the checkout at $COMFYUI_PATH or ~/ComfyUI) on the CPU (or the GPU ComfyUI finds).
UNets:
  tiny   the 1-level random SD1.5 test UNet (tests/host/comfy_harness.py); attention is a large share of it
  sd15   a full-size SD1.5 UNet (860M parameters: 4 levels, 16 transformer blocks) with random weights, built
         in memory from ComfyUI's own SD15 config (no download)
For each repetition, in this order on the same seed and settings:
  plain     KSampler with CLIPTextEncode of the prompt, unpatched model
  guide     HighlightScribbleGuide (2 phrases, strength 1, guided over the whole run: the worst case)
  refocus   the guide plus refocusing on every step with --refocus-iterations iterations
and prints medians, guide/plain overhead and refocusing's cost per step and per iteration.

    .venv/bin/python bench/bench_highlight.py --unet sd15 --size 256 --steps 4 --reps 3
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

STROKES = {"version": 1, "strokes": [
    {"phrase": "a cat", "width": 0.14, "points": [[0.12, 0.8], [0.22, 0.7], [0.34, 0.66], [0.44, 0.7]]},
    {"phrase": "a red ball", "width": 0.1, "points": [[0.72, 0.3], [0.8, 0.26], [0.84, 0.34], [0.76, 0.38]]}]}
PROMPT = "a cat and a red ball on a lawn, photo"


def full_sd15_model(tiny_model):  # type: ignore[no-untyped-def]
    """A ModelPatcher around a full-size SD1.5 UNet with seeded random weights (ComfyUI's SD15 config)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    unet_config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                   "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_heads": 8, "num_head_channels": -1, "use_temporal_resblock": False,
                   "use_temporal_attention": False}
    cfg = comfy.supported_models.SD15(unet_config)
    cfg.set_inference_dtype(tiny_model.model.get_dtype(), None)
    model = cfg.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p[0].numel(), 1)) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
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
    common = dict(prompt=PROMPT, highlights=json.dumps(STROKES), width=args.size, height=args.size, strength=1.0,
                  start_percent=0.0, end_percent=1.0, schedule="constant", edge_softness=0.5, refocus_step_size=0.05)
    with torch.inference_mode():
        plain_cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        guided = guide.execute(model=model, clip=clip, refocus_percent=0.0, refocus_iterations=0, **common).args
        refocus = guide.execute(model=model, clip=clip, refocus_percent=1.0,
                                refocus_iterations=args.refocus_iterations, **common).args
    lat = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    runs = {"plain": (model, plain_cond), "guide": (guided[0], guided[1]), "refocus": (refocus[0], refocus[1])}

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
    per_step = (med["refocus"] - med["guide"]) / args.steps
    result = {
        "unet": args.unet, "size": args.size, "steps": args.steps, "cfg": args.cfg, "reps": args.reps,
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
    print(f"  refocus {med['refocus']:.2f}s  +{per_step:.2f}s per step "
          f"({per_step / (med['plain'] / args.steps):.1f}x a plain step) "
          f"with {args.refocus_iterations} iteration(s)")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
