"""Import throughput benchmark: ``noisequery_core.import_folder`` vs the reference DataLoader pipeline.

A folder of synthetic seed-named PNGs is made with ``noisequery_core.demo.make_sample_folder``
and the same ViT-B/32-sized CLIP with fixed random weights (``load_clip(ClipSpec("ViT-B-32",
"random"))``) is used by every variant:

* ``ours (full)``: ``import_folder`` with CLIP + colour features + 256 px WebP thumbnails,
  one durable commit per 32-image batch — what users get by default;
* ``ours (no thumbnails)``: the same with ``thumbnail_size=0``;
* ``ours (CLIP none, thumbnails)`` / ``ours (CLIP none, no thumbnails)``: colour-only libraries,
  which isolates decoding + colour features (+ thumbnails) + commits;
* ``reference``: the shape of the public NoiseQuery pipeline — a torch ``DataLoader``
  (``num_workers=2``) over the files applying the same open_clip preprocess, one
  ``model.encode_image`` per batch, L2-normalised fp16 features collected in RAM. No colour
  features, no thumbnails, no disk commits: ours does strictly more work per image;
* ``CLIP forward only``: ``encode_images`` on already-preprocessed batches — the floor that
  both pipelines pay.

Each variant runs ``--reps`` times (fresh library folder each time, variants interleaved so that
background load hits them alike); the median wall time gives images/s. Prints a markdown table
and writes JSON (``bench/results/import.json``).

Examples::

    .venv/bin/python bench/bench_import.py --quick
    .venv/bin/python bench/bench_import.py --count 256 --size 256 --reps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_env import environment  # noqa: E402  (bench/ is on sys.path when run as a script)

from noisequery_core.demo import make_sample_folder  # noqa: E402
from noisequery_core.library.ingest import import_folder  # noqa: E402
from noisequery_core.library.storage import Library  # noqa: E402
from noisequery_core.search.clip import ClipEmbedder, ClipSpec, load_clip  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_busy_s() -> float:
    """CPU seconds spent busy by all processes since boot, summed over cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # children: the DataLoader workers, counted once they have been joined
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, average CPU cores that *other* processes used meanwhile)."""
    b0, o0, t0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    others = (_cpu_busy_s() - b0) - (_own_cpu_s() - o0)
    return wall, max(0.0, others / max(wall, 1e-9))


def image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix == ".png"), key=lambda p: int(p.stem))


# ----------------------------------------------------------------------------- reference pipeline


class _FileDataset:
    """torch Dataset over image files applying the CLIP preprocess (map-style)."""

    def __init__(self, files: list[Path], preprocess: Any):
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.preprocess(im.convert("RGB"))


def reference_pipeline(files: list[Path], embedder: ClipEmbedder, batch_size: int, workers: int) -> np.ndarray:
    """DataLoader → preprocess → encode_image per batch → normalised fp16 features in RAM."""
    import torch
    from torch.utils.data import DataLoader

    dataset: Any = _FileDataset(files, embedder.preprocess)  # map-style: __len__ + __getitem__
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    feats: list[np.ndarray] = []
    with torch.inference_mode():
        for pixels in loader:
            f = embedder.model.encode_image(pixels)
            f = torch.nn.functional.normalize(f.float(), dim=-1)
            feats.append(f.half().numpy())
    return np.concatenate(feats)


def forward_only(batches: list[Any], embedder: ClipEmbedder) -> None:
    for b in batches:
        embedder.encode_images(b)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=256, help="number of synthetic images")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--reps", type=int, default=3, help="repetitions per variant (median reported; ≥3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for ours and the reference")
    p.add_argument(
        "--workers", type=int, default=2, help="decode workers (threads for ours, DataLoader processes for the reference)"
    )
    p.add_argument("--no-durable", action="store_true", help="ours without fsync per commit (default: durable, as users get)")
    p.add_argument(
        "--variants", default="", help="comma-separated subset of: full,nothumbs,colour,colour_nothumbs,reference,forward"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 3 reps")
    p.add_argument("--workdir", default=None, help="where the image folder and libraries go (default: system temp)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/import.json, import_quick.json with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.count = min(args.count, 64)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("noisequery").setLevel(logging.ERROR)  # silence the "RANDOM weights" warning
    import torch

    out = Path(args.out) if args.out else RESULTS_DIR / ("import_quick.json" if args.quick else "import.json")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nq-bench-import-", dir=args.workdir))
    try:
        images = tmp / "images"
        t0 = time.perf_counter()
        make_sample_folder(images, args.count, size=args.size)
        files = image_files(images)
        log(f"made {len(files)} images of {args.size}px in {time.perf_counter() - t0:.1f}s")
        embedder = load_clip(ClipSpec("ViT-B-32", "random"), allow_download=False)
        durable = not args.no_durable

        # Warm-up: one forward pass, so first-call allocations count for nobody.
        from PIL import Image

        with Image.open(files[0]) as im:
            x = embedder.preprocess(im.convert("RGB"))
        embedder.encode_images(torch.stack([x] * min(args.batch_size, len(files))))

        pre_batches: list[Any] = []
        runs_counter = [0]

        def ours(clip: bool, thumbs: int) -> Callable[[], None]:
            def run() -> None:
                runs_counter[0] += 1
                lib_dir = tmp / f"lib{runs_counter[0]}"
                rep = import_folder(
                    images,
                    lib_dir,
                    embedder=embedder if clip else None,
                    thumbnail_size=thumbs,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    durable=durable,
                )
                if rep.added != len(files) or Library.open(lib_dir).count != len(files):
                    raise RuntimeError(f"import added {rep.added} of {len(files)}: {rep.summary()}")
                shutil.rmtree(lib_dir, ignore_errors=True)

            return run

        def reference() -> None:
            feats = reference_pipeline(files, embedder, args.batch_size, args.workers)
            if feats.shape[0] != len(files):
                raise RuntimeError("reference produced the wrong number of features")

        def forward() -> None:
            if not pre_batches:
                raise RuntimeError("forward batches not prepared")
            forward_only(pre_batches, embedder)

        variants: dict[str, tuple[str, Callable[[], None]]] = {
            "full": ("ours (full: CLIP + colour + 256px thumbnails)", ours(True, 256)),
            "nothumbs": ("ours (no thumbnails)", ours(True, 0)),
            "colour": ("ours (CLIP none, 256px thumbnails)", ours(False, 256)),
            "colour_nothumbs": ("ours (CLIP none, no thumbnails)", ours(False, 0)),
            "reference": (f"reference (DataLoader workers={args.workers} + encode_image, fp16 in RAM)", reference),
            "forward": ("CLIP forward only (preprocessed batches)", forward),
        }
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(variants)
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(variants)}")
        if "forward" in chosen:
            pix = []
            for f in files:
                with Image.open(f) as im:
                    pix.append(embedder.preprocess(im.convert("RGB")))
            pre_batches = [torch.stack(pix[i : i + args.batch_size]) for i in range(0, len(pix), args.batch_size)]

        times: dict[str, list[float]] = {v: [] for v in chosen}
        others: dict[str, list[float]] = {v: [] for v in chosen}
        for rep in range(max(1, args.reps)):
            for v in chosen:
                wall, oth = timed(variants[v][1])
                times[v].append(wall)
                others[v].append(oth)
            log(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{v} {times[v][-1]:.1f}s" for v in chosen))

        rows: list[dict[str, Any]] = []
        ref_ips = None
        for v in chosen:
            med = statistics.median(times[v])
            ips = len(files) / med
            rows.append(
                {
                    "variant": v,
                    "label": variants[v][0],
                    "times_s": times[v],
                    "others_cores": others[v],
                    "median_s": med,
                    "images_per_s": ips,
                    "ms_per_image": 1000 * med / len(files),
                }
            )
            if v == "reference":
                ref_ips = ips
        for r in rows:
            r["vs_reference"] = r["images_per_s"] / ref_ips if ref_ips else None

        lines = [
            f"#### Import throughput: {len(files)} images of {args.size}px, batch {args.batch_size}, {args.workers} workers, "
            f"median of {args.reps}, durable={durable}",
            "",
            "| variant | median s | images/s | ms/image | vs reference | all runs s | other procs' CPU (cores, max) |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for r in rows:
            vs = f"{r['vs_reference']:.2f}×" if r["vs_reference"] else "—"
            lines.append(
                f"| {r['label']} | {r['median_s']:.2f} | {r['images_per_s']:.1f} | {r['ms_per_image']:.1f} | {vs} | "
                f"{', '.join(f'{t:.2f}' for t in r['times_s'])} | {max(r['others_cores']):.2f} |"
            )
        table = "\n".join(lines)
        wall = time.perf_counter() - t_start
        print(table)
        print(f"\nwall time {wall:.0f} s")
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "benchmark": "import",
            "argv": sys.argv[1:],
            "config": vars(args),
            "environment": environment(),
            "clip": embedder.identity.describe(),
            "wall_s": wall,
            "results": rows,
            "markdown": table,
        }
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
