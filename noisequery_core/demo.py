"""The embedded default demo: synthesise a seed-named image folder, import it, query it, draw a contact sheet.

Needs no downloads. The images stand in for a model's unconditional samples: each seed
draws a smooth random colour field (like a low-frequency initial noise decoded to colour).
Colour queries on them are meaningful; text queries are meaningful only with real CLIP
weights (the demo uses ViT-B-32/openai from the cache folder when present, else the same
architecture with fixed random weights, and says so on the sheet).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .library.ingest import import_folder
from .library.storage import Library
from .search.clip import ClipSpec, load_clip, local_weight_candidates
from .search.query import Hit, Query, Searcher, StatTarget
from .work import CheckCancel, Progress, never_cancel, no_progress

log = logging.getLogger("noisequery")


def synth_image(seed: int, size: int = 256) -> Image.Image:
    """A smooth colour field determined by ``seed`` (a stand-in for a decoded initial noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((4, 4, 3)).astype(np.float32)
    palette = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    bias = rng.uniform(-0.6, 0.6, 3).astype(np.float32)
    field = np.asarray(
        Image.fromarray(((np.tanh(coarse) + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
        dtype=np.float32,
    ) / 127.5 - 1.0
    rgb = 0.5 + 0.5 * np.tanh(field @ palette + bias)
    grain = rng.standard_normal((size, size, 1)).astype(np.float32) * rng.uniform(0.0, 0.08)
    return Image.fromarray((np.clip(rgb + grain, 0, 1) * 255).astype(np.uint8))


def make_sample_folder(folder: Path, count: int, *, first_seed: int = 0, size: int = 256) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + count):
        p = folder / f"{seed}.png"
        if not p.exists():
            synth_image(seed, size).save(p)


def contact_sheet(rows: list[tuple[str, list[Hit]]], library: Library, cell: int = 128, note: str = "") -> Image.Image:
    cols = max((len(h) for _, h in rows), default=1)
    label_h, caption_h, top = 22, 16, 24 if note else 0
    W = cols * cell
    H = top + len(rows) * (label_h + cell + caption_h)
    sheet = Image.new("RGB", (W, H), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    if note:
        draw.text((6, 5), note, fill=(255, 200, 80))
    y = top
    for title, hits in rows:
        draw.text((6, y + 5), title, fill=(235, 235, 235))
        y += label_h
        for i, h in enumerate(hits):
            if h.thumbnail is not None:
                with Image.open(h.thumbnail) as im:
                    sheet.paste(im.convert("RGB").resize((cell, cell)), (i * cell, y))
            draw.text((i * cell + 4, y + cell + 2), f"{h.seed}  {h.score:+.2f}", fill=(180, 180, 180))
        y += cell + caption_h
    return sheet


def run_demo(
    out: str | Path = "demo_out",
    *,
    count: int = 300,
    clip_cache: str | Path | None = None,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
) -> dict[str, Any]:
    """Run the whole pipeline on synthetic seed images; returns a summary (also written as JSON).

    ``progress`` and ``check_cancel`` (noisequery_core.work) follow the import of the images.
    """
    out = Path(out)
    images = out / "images"
    make_sample_folder(images, count)
    cache = Path(clip_cache) if clip_cache else Path.home() / ".cache" / "noisequery" / "clip"
    real = any(p.is_file() for p in local_weight_candidates(cache, "ViT-B-32", "openai"))
    spec = ClipSpec("ViT-B-32", "openai" if real else "random")
    embedder = load_clip(spec, cache_dir=cache, allow_download=False)
    report = import_folder(images, out / "library", embedder=embedder, batch_size=32, progress=progress,
                           check_cancel=check_cancel)
    lib = Library.open(out / "library")
    searcher = Searcher(lib, embedder=embedder)
    queries: list[tuple[str, Query]] = [
        ("colour: mostly orange #FF8800", Query(colors=(("#FF8800", 1.0),), top_k=8)),
        ("colour: dark (brightness 0.15) and saturated", Query(stats=(StatTarget("brightness", 0.15), StatTarget("saturation", lo=0.6)), top_k=8)),
        ("layout: bright top, blue bottom", _layout_query()),
        ("text: 'a sunset over the sea'", Query(text="a sunset over the sea", top_k=8)),
        ("text + colour: 'a sunset over the sea' and #2040FF", Query(text="a sunset over the sea", colors=(("#2040FF", 1.0),), top_k=8, diversity=0.3)),
    ]
    rows = [(title, searcher.search(q)) for title, q in queries]
    note = "" if real else (
        "CLIP has RANDOM weights (no ViT-B-32/openai weights in " + str(cache) + "): text rows are not meaningful"
    )
    sheet = contact_sheet(rows, lib, note=note)
    sheet_path = out / "contact_sheet.png"
    sheet.save(sheet_path)
    summary = {
        "import": report.to_json(),
        "library": str(lib.path),
        "entries": lib.count,
        "clip": embedder.identity.describe(),
        "clip_is_random": not real,
        "contact_sheet": str(sheet_path),
        "queries": {title: [h.to_json() for h in hits] for title, hits in rows},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def _layout_query() -> Query:
    from .search.query import RegionTarget

    return Query(regions=(RegionTarget("top", lightness=0.85), RegionTarget("bottom", color="#1030C0")), top_k=8)
