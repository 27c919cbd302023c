"""Library build throughput: BuildNoiseLibrary against a plain per-seed KSampler loop, side by side.

Runs a real ComfyUI in-process (the checkout at $COMFYUI_PATH or ~/ComfyUI) with the tiny
random-weight SD1.5 test checkpoint (tests/host/comfy_harness.py) on the CPU. For each
repetition it measures, on the same seeds and settings:

  loop      one KSampler (batch 1) + VAEDecode per seed — what queueing one prompt per seed does
  bare      our batched renderer alone (per-seed noise, no features, no writes)
  build     BuildNoiseLibrary's full path: batched rendering + features + thumbnails + commits
            (colour features only, and with a ViT-B-32 CLIP when --clip is given)

and prints images/s medians, build/loop speed-up and the feature overhead build/bare.

    .venv/bin/python bench/bench_build.py --size 256 --steps 8 --count 16 --batch 8
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--count", type=int, default=16, help="seeds per measurement")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clip", action="store_true", help="also measure with ViT-B-32 (random weights) CLIP features")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "build.json")
    args = ap.parse_args()

    import comfy_harness as H

    tmp = Path(tempfile.mkdtemp(prefix="nq_bench_build_"))
    ckpt = tmp / "ckpt" / "model.safetensors"
    H.make_tiny_sd15_checkpoint(ckpt)
    clip_dir = tmp / "clip"
    if args.clip:
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        m = open_clip.create_model("ViT-B-32")
        (clip_dir / "ViT-B-32").mkdir(parents=True)
        save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, str(clip_dir / "ViT-B-32" / "openai.safetensors"))
    nodes = H.boot_inprocess(None, extra_model_dirs={"checkpoints": ckpt.parent, "noise_libraries": tmp / "libs", "noisequery_clip": clip_dir},
                             custom_node_paths={"NoiseQuery": ROOT}, io_dir=tmp / "io")
    import torch

    M = nodes.NODE_CLASS_MAPPINGS
    model, clip, vae = M["CheckpointLoaderSimple"]().load_checkpoint(ckpt.name)[:3]
    cond = M["CLIPTextEncode"]().encode(clip, "")[0]
    build = M["BuildNoiseLibrary"]
    ks = M["KSampler"]()
    dec = M["VAEDecode"]()
    # ComfyUI imports the pack under a module name made from its path: find our sampling module.
    SeedRenderer = next(m for k, m in sys.modules.items() if k.endswith(".nodes.sampling") and hasattr(m, "SeedRenderer")).SeedRenderer

    common = dict(steps=args.steps, cfg=1.0, sampler_name=args.sampler, scheduler="normal")
    results: dict[str, list[float]] = {"loop": [], "bare": [], "build_colour": []}
    if args.clip:
        results["build_clip"] = []
    with torch.inference_mode():
        for rep in range(args.reps):
            base = 10_000 * (rep + 1)
            seeds = list(range(base, base + args.count))
            latent = {"samples": torch.zeros([1, 4, args.size // 8, args.size // 8])}
            t = time.perf_counter()
            for s in seeds:
                out = ks.sample(model, s, args.steps, 1.0, args.sampler, "normal", cond, cond, latent)[0]
                dec.decode(vae, out)
            results["loop"].append(args.count / (time.perf_counter() - t))

            r = SeedRenderer(model, vae, cond, cond, width=args.size, height=args.size, **common)
            t = time.perf_counter()
            for i in range(0, args.count, args.batch):
                r(seeds[i : i + args.batch])
            results["bare"].append(args.count / (time.perf_counter() - t))

            for key, clip_model in (("build_colour", "none"), ("build_clip", "ViT-B-32:openai")):
                if key not in results:
                    continue
                t = time.perf_counter()
                build.execute(model=model, vae=vae, positive=cond, negative=cond, library_name=f"{key}_{rep}", width=args.size,
                              height=args.size, seed_start=base, count=args.count, batch_size=args.batch, clip_model=clip_model,
                              thumbnail_size=256, **common)
                results[key].append(args.count / (time.perf_counter() - t))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    table = [
        f"| measurement | images/s (median of {args.reps}) | vs per-seed loop |",
        "| --- | --- | --- |",
    ]
    for k, v in med.items():
        table.append(f"| {k} | {v:.2f} | {v / med['loop']:.2f}× |")
    table.append(f"\nfeature + thumbnail + commit overhead (build_colour vs bare): {100 * (med['bare'] / med['build_colour'] - 1):+.1f}%")
    if "build_clip" in med:
        table.append(f"with ViT-B-32 CLIP (build_clip vs bare): {100 * (med['bare'] / med['build_clip'] - 1):+.1f}%")
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results, "median": med,
                                    "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
