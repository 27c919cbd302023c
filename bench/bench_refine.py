#!/usr/bin/env python3
"""Retrieve, then refine: NoiseQueryRefine vs best-of-N random seeds vs library top-1, at equal numbers of renders.

    .venv/bin/python bench/bench_refine.py                  # tiny random SD1.5, CPU, 64x64, 2 euler steps
    .venv/bin/python bench/bench_refine.py --quick          # 3 targets, 2 trials, budgets 8,16 (smoke run)

ComfyUI is booted in-process (scripts/noiseclr_train.py: boot) with this repo as the pack; every render goes
through the Refine node's own renderer (nodes/exploration_refine_nodes.NoiseRenderer: KSampler's path, batched),
and every score through the node's metric (noisequery_core/exploration/refine_metric: the library's query terms
computed on the render). The tiny model's weights are random, so only metrics computed on the render mean
something: brightness targets, the share of a colour, region lightness, and the 8x8 colour layout of an example.

For each target (a one-term query):
- library top-1: the best of a library of --library seeds (seeds 0..L-1, rendered once for all targets) by that
  term, which is what NoiseQueryColor returns first for a one-term query; 1 render at query time.
- best-of-N: the best of N fresh random seeds, N = budget (--trials independent draws).
- refine (library start): NoiseQueryRefine from the library top-1, N renders in all (the start included), one walk
  per --trials search_seed. The search is anytime (a budget-N walk is the first N renders of a longer one, see
  refine.py), so one walk of the largest budget gives every budget's result.
- refine (random start): the same from a random seed: the search alone, without retrieval.
Scores are each target's raw term (higher is better), reported as z-scores over the library's own renders (so
targets of different scales can be pooled): medians over targets x trials. "wins" is the share of target x (walk, draw) pairs
where refine beats best-of-N at that budget, over every walk x draw pair (ties count half).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=None)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--library", type=int, default=64, help="library size (seeds 0..L-1)")
    p.add_argument("--budgets", default="8,16,32,64")
    p.add_argument("--trials", type=int, default=3, help="random draws / walks per target")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--min-strength", type=float, default=0.05)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--targets", default="", help="comma-separated target numbers 0..6 (default: all 7)")
    p.add_argument("--random-start-trials", type=int, default=None, help="walks from random starts (default --trials)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "refine.json"))
    p.add_argument("--picture", default=None, help="also draw a walk (start, every accepted move, score curve) here")
    p.add_argument("--picture-only", action="store_true", help="draw the --picture walk and stop")
    a = p.parse_args()
    budgets = [int(b) for b in a.budgets.split(",")]
    if a.quick:
        budgets, a.trials, a.library = [8, 16], 2, 48

    import comfy_harness
    import noiseclr_train

    comfy_path = a.comfyui or str(comfy_harness.find_comfyui() or Path.home() / "ComfyUI")
    work = Path(tempfile.mkdtemp(prefix="nq_bench_refine_"))
    nodes, mod = noiseclr_train.boot(comfy_path, cpu=True)
    ckpt = str(comfy_harness.make_tiny_sd15_checkpoint(work / "tiny_sd15.safetensors", comfy_path))

    import torch

    root = mod.__name__.rsplit(".", 2)[0]
    glue = sys.modules[root + ".nodes.exploration_refine_nodes"]
    refine_mod = sys.modules[root + ".noisequery_core.exploration.refine"]
    metric_mod = sys.modules[root + ".noisequery_core.exploration.refine_metric"]
    explore = sys.modules[root + ".noisequery_core.exploration.explore"]
    noise_mod = sys.modules[root + ".noisequery_core.noise"]
    query_mod = sys.modules[root + ".noisequery_core.search.query"]
    color = sys.modules[root + ".noisequery_core.search.color"]
    from PIL import Image

    with torch.inference_mode():
        model, clip, vae, _ = noiseclr_train.load_checkpoint(nodes, ckpt)
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
        renderer = glue.NoiseRenderer(model, vae, empty, empty, width=a.size, height=a.size, steps=a.steps, cfg=1.0,
                                      sampler_name="euler", scheduler="normal", step_seed=0)
        shape = renderer.latent_shape
        renders = {"n": 0}

        def render(noises: Any) -> list[Image.Image]:
            renders["n"] += int(noises.shape[0])
            return glue.to_pil(renderer.render(noises)[1])

        def render_seeds(seeds: list[int]) -> list[Image.Image]:
            out: list[Image.Image] = []
            for i in range(0, len(seeds), 8):
                out += render(noise_mod.batch_noise(seeds[i:i + 8], shape))
            return out

        if a.picture:  # a brightness walk from a plain seed (no library needed): where the search moves is visible
            caption = walk_picture(Path(a.picture), query_mod.Query(stats=(query_mod.StatTarget("brightness",
                                   target=0.75),)), 30_000_000, 24, metric_mod, refine_mod, explore, render, renderer,
                                   shape, a)
            print(f"picture: {a.picture} (brightness 0.75: {caption})", file=sys.stderr)
            if a.picture_only:
                return 0

        t0 = time.perf_counter()
        lib_seeds = list(range(a.library))
        lib_images = render_seeds(lib_seeds)
        per_render = (time.perf_counter() - t0) / len(lib_seeds)
        print(f"library: {len(lib_seeds)} renders, {per_render * 1000:.0f} ms per render (with decode)", file=sys.stderr)

        # targets computed on renders of held-out seeds (so they are reachable by this model) and fixed values
        held = render_seeds([10_000_001, 10_000_002, 10_000_003])
        feats = color.analyse(held)

        def hex_of(im: Image.Image) -> str:
            r, g, b = (int(v) for v in np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0).round())
            return f"#{r:02X}{g:02X}{b:02X}"

        Q, ST, RT = query_mod.Query, query_mod.StatTarget, query_mod.RegionTarget
        targets = {
            "brightness 0.25": Q(stats=(ST("brightness", target=0.25),)),
            "brightness 0.75": Q(stats=(ST("brightness", target=0.75),)),
            f"colour {hex_of(held[0])}": Q(colors=((hex_of(held[0]), 1.0),)),
            f"colour {hex_of(held[1])}": Q(colors=((hex_of(held[1]), 1.0),)),
            "top light, bottom dark": Q(regions=(RT("top", lightness=0.9), RT("bottom", lightness=0.1))),
            "layout of seed 10000002": Q(layout=feats.layout[1]),
            "layout of seed 10000003": Q(layout=feats.layout[2]),
        }
        if a.quick:
            targets = dict(list(targets.items())[:3])
        elif a.targets:
            items = list(targets.items())
            targets = dict(items[int(i)] for i in a.targets.split(","))

        # best-of-N draws: the same random seeds for every target (a render does not depend on the target)
        random_images = [render_seeds([20_000_000 + 1000 * t + i for i in range(max(budgets))]) for t in range(a.trials)]


        results: dict[str, Any] = {"size": a.size, "steps": a.steps, "library": a.library, "budgets": budgets,
                                   "trials": a.trials, "batch": a.batch, "strength": a.strength,
                                   "min_strength": a.min_strength, "ms_per_render": per_render * 1000, "targets": {}}
        for name, q in targets.items():
            score_parts, metric = metric_mod.build_metric(metric_mod.MetricSpec(query=q))

            def total(images: list[Image.Image], parts_fn: Any = score_parts, m: Any = metric) -> np.ndarray:
                parts = parts_fn(images)
                if not m.calibrated:
                    m.calibrate(parts)
                return m.combine(parts)

            lib_scores = total(lib_images)
            mu, sd = float(lib_scores.mean()), float(lib_scores.std()) or 1.0

            def z(x: float, mu: float = mu, sd: float = sd) -> float:
                return (float(x) - mu) / sd

            top = int(np.argmax(lib_scores))
            row: dict[str, Any] = {"library_top1": z(lib_scores[top]), "library_top1_seed": lib_seeds[top]}
            rnd_curves = []
            for images in random_images:
                s = total(images)
                rnd_curves.append([z(max(s[:n])) for n in budgets])
            row["best_of_n"] = rnd_curves
            for start_kind in ("library", "random"):
                walks = []
                trials = a.trials if start_kind == "library" or a.random_start_trials is None else a.random_start_trials
                for t in range(trials):
                    start_seed = lib_seeds[top] if start_kind == "library" else 30_000_000 + t
                    # the search is anytime (refine.py): the best after n renders of one walk of the largest budget
                    # is what a walk of budget n reaches, so one walk gives every budget
                    renderer.step_seed = start_seed
                    h = explore.History(start_seed)
                    settings = refine_mod.RefineSettings(budget=max(budgets), batch=a.batch, strength=a.strength,
                                                         min_strength=a.min_strength, search_seed=t)
                    # the library-calibrated metric (several terms: z-scores frozen on the library's renders), so
                    # every method is scored on one scale
                    res = refine_mod.refine(explore.replay_noise(h, shape), h, render, score_parts,
                                            copy.deepcopy(metric), settings)
                    assert res.renders == max(budgets)
                    got = [z(res.curve[n - 1]) for n in budgets]
                    walks.append(got)
                row[f"refine_{start_kind}"] = walks
            results["targets"][name] = row
            results["renders"], results["seconds"] = renders["n"], time.perf_counter() - t0
            write_summary(results, budgets, a, Path(a.json), final=False)
            print(f"{name}: library top-1 z {row['library_top1']:+.2f}; " + "; ".join(
                f"N={n}: best-of-N {statistics.median(c[i] for c in rnd_curves):+.2f} refine(lib) "
                f"{statistics.median(w[i] for w in row['refine_library']):+.2f} refine(rnd) "
                f"{statistics.median(w[i] for w in row['refine_random']):+.2f}" for i, n in enumerate(budgets)),
                file=sys.stderr)
        results["renders"] = renders["n"]
        results["seconds"] = time.perf_counter() - t0

    write_summary(results, budgets, a, Path(a.json), final=True)
    return 0


def write_summary(results: dict[str, Any], budgets: list[int], a: Any, out: Path, final: bool) -> None:
    """Medians and win rates over the targets done so far; the JSON (and, when final, the markdown table)."""
    rows = results["targets"].values()
    summary = []
    for i, n in enumerate(budgets):
        def med(key: str, i: int = i) -> float:
            return statistics.median(v[i] for r in rows for v in r[key])

        def wins(key: str, i: int = i) -> float:
            w = 0.0
            pairs = 0
            for r in rows:
                for ref, rnd in ((x, y) for x in r[key] for y in r["best_of_n"]):  # every walk vs every draw
                    w += 1.0 if ref[i] > rnd[i] else 0.5 if ref[i] == rnd[i] else 0.0
                    pairs += 1
            return w / max(pairs, 1)

        summary.append({"budget": n, "library_top1": statistics.median(r["library_top1"] for r in rows),
                        "best_of_n": med("best_of_n"), "refine_library": med("refine_library"),
                        "refine_random": med("refine_random"), "wins_refine_library": wins("refine_library"),
                        "wins_refine_random": wins("refine_random")})
    results["summary"] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if not final:
        return
    print(f"\n{len(results['targets'])} targets x {a.trials} trials, {a.size}x{a.size}, {a.steps} euler steps, "
          f"library {a.library}, batch {a.batch}, strength {a.strength}->{a.min_strength}; "
          f"{results['renders']} renders in {results['seconds']:.0f} s\n")
    print("| renders | library top-1 | best-of-N random | refine (library start) | refine (random start) | "
          "refine(lib) beats best-of-N | refine(rnd) beats best-of-N |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in summary:
        print(f"| {s['budget']} | {s['library_top1']:+.2f} | {s['best_of_n']:+.2f} | {s['refine_library']:+.2f} | "
              f"{s['refine_random']:+.2f} | {s['wins_refine_library']:.0%} | {s['wins_refine_random']:.0%} |")
    print(f"\n(median z-scores over the library's renders; JSON: {out})\n")
    print(per_target_table(results, budgets))


def per_target_table(results: dict[str, Any], budgets: list[int]) -> str:
    """Markdown: per target, the library top-1 and at each budget the medians of best-of-N / refine (library start)
    / refine (random start) over that target's draws and walks, and whether refine (library start) beats best-of-N
    on the medians at every budget >= 16."""
    head = ["target", "library top-1"] + [f"{n}: best-of-N / refine (lib) / refine (rnd)" for n in budgets]
    lines = ["| " + " | ".join(head + ["refine (lib) > best-of-N at every budget >= 16"]) + " |",
             "| --- | " + " | ".join("---:" for _ in head[1:]) + " | :---: |"]
    for name, r in results["targets"].items():
        cells, beats = [], True
        for i, n in enumerate(budgets):
            med = [statistics.median(v[i] for v in r[key]) for key in ("best_of_n", "refine_library", "refine_random")]
            cells.append(" / ".join(f"{m:+.2f}" for m in med))
            if n >= 16 and not med[1] > med[0]:
                beats = False
        lines.append(f"| {name} | {r['library_top1']:+.2f} | " + " | ".join(cells) + f" | {'yes' if beats else 'no'} |")
    return "\n".join(lines)


def walk_picture(path: Path, query: Any, start_seed: int, budget: int, metric_mod: Any, refine_mod: Any, explore: Any,
                 render: Any, renderer: Any, shape: Any, a: Any) -> str:
    """One walk for a one-term target from a plain seed: the start, the render after every accepted move (replayed
    from the history prefix), and the score curve, side by side. Returns a caption."""
    from PIL import Image, ImageDraw

    score_parts, metric = metric_mod.build_metric(metric_mod.MetricSpec(query=query))
    renderer.step_seed = start_seed
    h = explore.History(start_seed)
    start = explore.replay_noise(h, shape)
    res = refine_mod.refine(start, h, render, score_parts, metric,
                            refine_mod.RefineSettings(budget=budget, batch=a.batch, strength=a.strength,
                                                      min_strength=a.min_strength))
    frames = [render(refine_mod.replay(start, res.history.picks[:k])[None])[0] for k in range(res.moves + 1)]
    cell = 128
    curve = Image.fromarray(metric_mod.curve_image(res.scores, res.curve, 2 * cell, cell))
    sheet = Image.new("RGB", (cell * len(frames) + curve.width, cell + 18), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(frames):
        sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (i * cell, 18))
        draw.text((i * cell + 4, 3), "start" if i == 0 else f"move {i}", fill=(0, 0, 0))
    sheet.paste(curve, (cell * len(frames), 18))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return (f"seed {start_seed}, {budget} renders, {res.moves} accepted moves, score {res.start_score:.3f} -> "
            f"{res.best_score:.3f}")


if __name__ == "__main__":
    sys.exit(main())
