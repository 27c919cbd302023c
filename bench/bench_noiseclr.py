#!/usr/bin/env python3
"""NoiseCLR cost: seconds per training iteration, and per sampling step with 0/1/2/4 active directions.

    .venv/bin/python bench/bench_noiseclr.py                       # tiny random SD1.5, CPU, 64x64
    .venv/bin/python bench/bench_noiseclr.py --gpu --ckpt /models/v1-5-pruned-emaonly.safetensors --size 512
    .venv/bin/python bench/bench_noiseclr.py --family sd3                # tiny random SD3 (or sdxl, flux), CPU

--family uses the tiny random checkpoints and text encoders of tests/host/family_models.py (its per-machine
cache); directions then have a pooled part, and sampling runs the family's own conditioning (Flux: guidance 3.5).

ComfyUI is booted in-process (scripts/noiseclr_train.py: boot) with this repo as the pack. Sampling is
KSampler's path (comfy.sample.sample, euler, cfg 1, empty prompt) with the model patched by
NoiseCLRApplyDirections' own apply_directions; "batched" is the pack's behaviour (∅ and every active direction
in one calc_cond_batch call per step), "one call each" is the reference implementation's cost (one extra UNet
call per direction, plus ∅). Each figure is the median over steps of --repeats runs, all in one process, the
configurations taken in turn (round-robin). Training: median seconds per iteration of the train node's own loop (run_training), after the
first iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=None)
    p.add_argument("--ckpt", default=None, help="checkpoint path (default: a tiny random SD1.5 made on the fly)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--size", type=int, default=64, help="image size (sampling and training)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-iterations", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--directions-per-iteration", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "sd3", "flux"),
                   help="tiny random model family (ignored with --ckpt, which is loaded with its own CLIP)")
    a = p.parse_args()

    import comfy_harness
    import noiseclr_train

    comfy_path = a.comfyui or str(comfy_harness.find_comfyui() or Path.home() / "ComfyUI")
    work = Path(tempfile.mkdtemp(prefix="nq_bench_noiseclr_"))
    yaml = work / "paths.yaml"
    yaml.write_text(json.dumps({"bench": {"noiseclr_directions": str(work / "dirs"),
                                          "noise_libraries": str(work / "libs"),
                                          "noisequery_clip": str(work / "clip")}}))
    for d in ("dirs", "libs", "clip"):
        (work / d).mkdir()
    nodes, mod = noiseclr_train.boot(comfy_path, cpu=not a.gpu, extra_model_paths=str(yaml))
    family = "sd15" if a.ckpt else a.family
    if a.ckpt:
        ckpt = a.ckpt
    elif family == "sd15":
        ckpt = str(comfy_harness.make_tiny_sd15_checkpoint(work / "tiny_sd15.safetensors", comfy_path))
    else:
        import family_models

        ckpt = str(family_models.cached_family_checkpoint(family, comfy_path))

    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch
    from test_noiseclr_nodes import write_domain

    core = sys.modules[mod.__name__.rsplit(".", 2)[0] + ".noisequery_core.directions.noiseclr"]
    dev = comfy.model_management.get_torch_device()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results: dict[str, Any] = {"device": str(dev), "checkpoint": Path(ckpt).name, "size": a.size, "steps": a.steps,
                               "family": family}
    with torch.inference_mode():
        model, clip, vae, _ = noiseclr_train.load_checkpoint(nodes, ckpt)
        if clip is None and family != "sd15":
            clip = family_models.tiny_clip(family)  # the tiny checkpoints carry no text encoder
        fam = mod.check_supported(model)
        empty, empty_pooled = mod.empty_conditioning(clip)
        empty_pooled = empty_pooled if fam.pooled else None

        # ---------------- sampling: per-step cost with 0/1/2/4 directions
        g = torch.Generator().manual_seed(0)
        pooled = (empty_pooled.unsqueeze(0) + 0.3 * torch.randn(4, *empty_pooled.shape, generator=g)
                  if empty_pooled is not None else None)
        d = core.Directions(directions=empty.unsqueeze(0) + 0.3 * torch.randn(4, *empty.shape, generator=g),
                            empty=empty, pooled=pooled, empty_pooled=empty_pooled, family=fam.key)
        cond = mod.empty_prompt_conditioning(d)
        channels = model.get_model_object("latent_format").latent_channels
        latent = torch.zeros(1, channels, a.size // 8, a.size // 8)
        noise = torch.randn(latent.shape, generator=g)

        def per_step(m: Any) -> list[float]:
            stamps: list[float] = []

            def cb(step: int, x0: Any, x: Any, total: int) -> None:
                sync()
                stamps.append(time.perf_counter())

            sync()
            t0 = time.perf_counter()
            comfy.sample.sample(m, noise, a.steps, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0,
                                callback=cb, disable_pbar=True, seed=0)
            return [b - a_ for a_, b in zip([t0, *stamps[:-1]], stamps, strict=True)][1:]

        per_step(model)  # warm-up (loads the model)
        configs = [(n, label, batched) for n in (0, 1, 2, 4)
                   for label, batched in (("batched", True), ("one call each", False)) if n or batched]
        patched = {(n, label): mod.apply_directions(model, d, [(i, 1.0, 0.0, 1.0) for i in range(n)],
                                                    batched=batched)[0] for n, label, batched in configs}
        # Round-robin over the configurations, so that a busy moment of a shared machine hits them all alike.
        times: dict[tuple[int, str], list[float]] = {(n, label): [] for n, label, _ in configs}
        for _ in range(a.repeats):
            for n, label, _ in configs:
                times[(n, label)] += per_step(patched[(n, label)])
        rows = []
        for n in (0, 1, 2, 4):
            line: dict[str, Any] = {"directions": n}
            for (m, label), ts in times.items():
                if m == n:
                    line[label] = statistics.median(ts)
                    line[label + " (min)"] = min(ts)
            rows.append(line)
        results["sampling"] = rows

        # ---------------- training: per-iteration cost
        folder = write_domain(work / "images", count=max(4, a.batch_size))
        from PIL import Image

        arrays = []
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                arrays.append(mod._square(im, a.size))
        settings = core.TrainSettings(num_directions=max(4, a.directions_per_iteration),
                                      directions_per_iteration=a.directions_per_iteration,
                                      iterations=a.train_iterations, batch_size=a.batch_size, learning_rate=1e-3,
                                      checkpoint_every=10_000)
        stamps: list[float] = []

        def progress(done: int, total: int, message: str = "") -> None:
            sync()
            stamps.append(time.perf_counter())

        mod.run_training(model, clip, vae, arrays, "bench", settings, work / "dirs" / "bench.safetensors",
                         resume=False, progress=progress)
        its = [b - a_ for a_, b in zip(stamps[:-1], stamps[1:], strict=True)][1:]
        results["training"] = {"seconds_per_iteration": statistics.median(its), "min": min(its),
                               "iterations_timed": len(its),
                               "batch_size": a.batch_size, "directions_per_iteration": a.directions_per_iteration,
                               "unet_rows_per_iteration": a.batch_size * (a.directions_per_iteration + 1)}

    base = rows[0]["batched"]
    print(f"device {results['device']}, {results['checkpoint']} ({family}), {a.size}x{a.size}, euler cfg 1, {a.steps} steps, "
          f"median of {a.repeats} runs")
    base_min = rows[0]["batched (min)"]
    print("seconds per sampling step: median (min) over all steps of all runs")
    print(f"{'directions':>10} | {'batched':>17} | {'one call each':>17} | {'batched / 0 dirs':>16}")
    for r in rows:
        ref = f"{r['one call each']:.4f} ({r['one call each (min)']:.4f})" if "one call each" in r else "-"
        ratio = f"{r['batched'] / base:.2f} ({r['batched (min)'] / base_min:.2f})"
        print(f"{r['directions']:>10} | {r['batched']:.4f} ({r['batched (min)']:.4f}) | {ref:>17} | {ratio:>16}")
    t = results["training"]
    print(f"training: {t['seconds_per_iteration']:.3f} s/iteration, min {t['min']:.3f} (batch {t['batch_size']}, "
          f"{t['directions_per_iteration']} directions/iteration = {t['unet_rows_per_iteration']} UNet rows, "
          f"median of {t['iterations_timed']})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
