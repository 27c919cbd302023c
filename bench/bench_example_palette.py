"""'Like this image' (an uploaded example) on natural photographs: colour layout alone vs layout + palette.

Data: crops of the 7 colour photographs bundled with scikit-image (bench_color_quality.make_crops: random position,
scale and aspect, fixed seed; the hue-rotated half left out), as a colour-only library whose features the library's
own code computes (the path an import takes). Examples: crops drawn with another seed, each of them uploaded as
drawn and mirrored left-right (the same colours, arranged differently), through LibraryService.add_example — the
browser's "upload image". Relevant: the library entries cut from the same photograph.

Compared, on the same library and examples:
  * layout: the example's 8×8 colour layout only, at the example's weight (what "upload image" used before);
  * layout + palette: the service's query as it is now (layout and palette, each at half the weight).

Per example: precision@k (share of the top k from the example's photograph) and the rank of the first relevant hit.

    .venv/bin/python bench/bench_example_palette.py            # 7 x 40 library crops, 7 x 6 examples (x 2 mirrored)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_color_quality import PHOTOS, features, make_crops  # noqa: E402

from noisequery_core.library.manifest import FeatureSet, GenerationKey  # noqa: E402
from noisequery_core.library.storage import Library  # noqa: E402
from noisequery_core.search import color  # noqa: E402
from noisequery_core.search.query import Query, Searcher  # noqa: E402
from noisequery_core.search.service import PAGE_MAX, LibraryService  # noqa: E402


def natural(per_photo: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """The crops that keep their colours (make_crops hue-rotates every second one) and their photo index."""
    crops = make_crops(per_photo * 2, seed=seed)
    keep = [(c, i // (per_photo * 2)) for i, c in enumerate(crops) if i % 2 == 0]
    return [c for c, _ in keep], [p for _, p in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-photo", type=int, default=40, help="library crops per photograph")
    ap.add_argument("--examples", type=int, default=6, help="example crops per photograph (each also mirrored)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    lib_crops, lib_photo = natural(a.per_photo, seed=0)
    ex_crops, ex_photo = natural(a.examples, seed=1)
    root = Path(tempfile.mkdtemp(prefix="nq_bench_example_")) / "libs"
    lib = Library.create(root / "crops", GenerationKey(model="photos"),
                         FeatureSet(clip=None, color_version=color.COLOR_VERSION))
    with lib.writer(durable=False) as w:
        w.append(np.arange(len(lib_crops), dtype=np.uint64), features(lib_crops))
    photo_of_seed = np.asarray(lib_photo)
    svc = LibraryService(lambda: [root])
    searcher = Searcher(Library.open(root / "crops"))

    def measure(seeds: list[int], photo: int) -> tuple[float, int]:
        rel = [photo_of_seed[s] == photo for s in seeds]
        first = next((i + 1 for i, r in enumerate(rel) if r), len(seeds) + 1)
        return float(np.mean(rel[: a.top_k])), first

    rows: dict[str, dict[str, list[float]]] = {}
    for crop, photo in zip(ex_crops, ex_photo):
        for view, img in (("as cut", crop), ("mirrored", crop[:, ::-1])):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG")
            ex = svc.add_example(buf.getvalue())
            layout, pal = color.example_targets(img)  # what the upload was analysed into (PNG: the same pixels)
            n = min(lib.count, PAGE_MAX)  # ranks past one page count as PAGE_MAX + 1, for every query alike
            got = svc.query({"library": "crops", "like_image": {"id": ex["id"]}, "limit": n})
            both = [int(h["seed"]) for h in got["hits"]]
            base = Query(layout=layout, layout_weight=1.0, top_k=n)
            layout_only = [h.seed for h in searcher.search(base)]
            palette_only = [h.seed for h in searcher.search(replace(base, layout=None, palette=pal))]
            for name, seeds in (("layout", layout_only), ("palette", palette_only), ("layout + palette", both)):
                prec, first = measure(seeds, photo)
                r = rows.setdefault(f"{name} | {view}", {"precision": [], "first": []})
                r["precision"].append(prec)
                r["first"].append(first)

    print(f"library: {lib.count} crops of {len(PHOTOS)} photographs; examples: {len(ex_crops)} crops, each as cut and "
          f"mirrored; k = {a.top_k}\n")
    print(f"| query | example | mean precision@{a.top_k} | median rank of the first relevant hit |")
    print("| --- | --- | --- | --- |")
    out = {}
    for key, r in rows.items():
        name, view = key.split(" | ")
        out[key] = {"precision_mean": float(np.mean(r["precision"])), "first_median": statistics.median(r["first"])}
        print(f"| {name} | {view} | {out[key]['precision_mean']:.3f} | {out[key]['first_median']:g} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
