"""Command line: ``python -m noisequery_core {import,search,info,verify,merge,index,upgrade,demo}``.

Bad input exits with status 2 and a one-line ``error: …`` message; ``--json`` prints
machine-readable output on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import NoiseQueryError
from .search import color

DEFAULT_CLIP_CACHE = Path.home() / ".cache" / "noisequery" / "clip"


class BarProgress:
    """The core's ``progress(done, total, message)`` (noisequery_core.work) as a tqdm bar on stderr.

    Use as a context manager so the bar is closed however the command ends; ``enabled=False``
    (``--quiet``) draws nothing.
    """

    def __init__(self, label: str, enabled: bool = True, unit: str = "it"):
        self.label, self.enabled, self.unit = label, enabled, unit
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.label, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        bar = self._bar
        if bar.total != total:  # a stage with another size (e.g. the index after the import)
            bar.reset(total=total)
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)

    def __enter__(self) -> BarProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clip_from_args(args: argparse.Namespace) -> Any:
    from .search.clip import ClipSpec, load_clip

    if args.clip_model in ("none", "") and not args.clip_config:
        return None
    spec = ClipSpec(args.clip_model if args.clip_model != "none" else "", args.clip_pretrained, args.clip_config or "")
    return load_clip(spec, cache_dir=args.clip_cache, device=args.device, allow_download=not args.offline)


def cmd_import(args: argparse.Namespace) -> Any:
    from .library.ingest import import_folder

    embedder = _clip_from_args(args)
    with BarProgress("import", not args.quiet, "img") as progress:
        rep = import_folder(
            args.images,
            args.library,
            embedder=embedder,
            thumbnail_size=args.thumbnail_size,
            thumbnail_format=args.thumbnail_format,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=progress,
        )
    return rep.to_json() if args.json else rep.summary()


def _parse_weighted(text: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition("@")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            raise NoiseQueryError(f"weight in {text!r} is not a number (write VALUE@WEIGHT, e.g. '#FF8800@2').") from None
    return text, 1.0


def cmd_search(args: argparse.Namespace) -> Any:
    from .library.storage import Library
    from .search.clip import check_identity, load_clip, spec_for_identity
    from .search.query import Query, RegionTarget, Searcher, format_report, parse_stat_arg

    lib = Library.open(args.library)
    embedder = None
    image_emb = None
    layout = None
    need_clip = bool(args.text or args.negative or (args.like_image and lib.has_clip))
    if need_clip and lib.features.clip is not None:
        spec = spec_for_identity(lib.features.clip, args.clip_weights, args.clip_config)
        embedder = load_clip(spec, cache_dir=args.clip_cache, device=args.device, allow_download=not args.offline)
        check_identity(embedder, lib.features.clip)
    if args.like_image:
        from PIL import Image

        from .imaging import ImageDecodeError, load_image

        try:
            im = load_image(args.like_image)  # upright, 8-bit by the file's real range (as import sees it)
        except (OSError, Image.DecompressionBombError, ImageDecodeError) as exc:
            raise NoiseQueryError(f"--like-image {args.like_image}: cannot read the image ({exc}).") from None
        layout = color.analyse([im]).layout[0]
        if embedder is not None:
            image_emb = embedder.encode_images(embedder.preprocess(im).unsqueeze(0))[0]
    stats = []
    for name in color.STAT_NAMES:
        val = getattr(args, name, None)
        if val is not None:
            v, w = _parse_weighted(val)
            stats.append(parse_stat_arg(name, v, w))
    regions = []
    for spec_text in args.region or []:
        name, sep, target = spec_text.partition("=")
        if not sep:
            raise NoiseQueryError(f"--region {spec_text!r}: write REGION=#RRGGBB or REGION=L (lightness 0..1).")
        target, w = _parse_weighted(target)
        if target.startswith("#"):
            regions.append(RegionTarget(name, color=target, weight=w))
        else:
            try:
                regions.append(RegionTarget(name, lightness=float(target), weight=w))
            except ValueError:
                raise NoiseQueryError(f"--region {spec_text!r}: {target!r} is neither #RRGGBB nor a lightness 0..1.") from None
    q = Query(
        text=args.text or "",
        negative_text=args.negative or "",
        image_embedding=image_emb,
        colors=tuple(_parse_weighted(c) for c in (args.color or [])),
        stats=tuple(stats),
        regions=tuple(regions),
        layout=layout,
        exclude_seeds=tuple(args.exclude or ()),
        top_k=args.top_k,
        diversity=args.diversity,
    )
    hits = Searcher(lib, embedder=embedder).search(q)
    return [h.to_json() for h in hits] if args.json else format_report(hits)


def cmd_info(args: argparse.Namespace) -> Any:
    from .library.storage import Library

    lib = Library.open(args.library)
    info = lib.info()
    if args.json:
        return info
    m = lib.manifest
    return "\n".join(
        [
            f"library   {lib.path}",
            f"entries   {m.count} (seeds {info['seed_min']}..{info['seed_max']})",
            f"schema    {m.schema_version}",
            f"generated {m.generation.describe()}",
            f"features  {m.features.describe()}",
            f"updated   {m.updated}",
        ]
    )


def cmd_verify(args: argparse.Namespace) -> Any:
    from .library.maintenance import verify

    rep = verify(args.library)
    args._exit = 0 if rep.ok else 1
    if args.json:
        return rep.to_json()
    lines = [f"{rep.path}: {'OK' if rep.ok else 'DAMAGED'} ({rep.count} entries)"]
    lines += [f"  problem: {p}" for p in rep.problems] + [f"  warning: {w}" for w in rep.warnings]
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> Any:
    from .library.maintenance import merge

    with BarProgress("merge", not args.quiet, "entry") as progress:
        rep = merge(args.sources, args.into, progress=progress)
    return rep.to_json() if args.json else f"merged {rep.added} entries into {args.into} ({rep.overlapping} overlapping seeds skipped)"


def cmd_index(args: argparse.Namespace) -> Any:
    from .library.storage import Library
    from .search.index import EXACT_MAX, IVF_MIN_ROWS, ensure_index, exact_note

    lib = Library.open(args.library)
    if not lib.has_clip:
        raise NoiseQueryError(f"Library {lib.path} has no CLIP features; there is nothing to index.")
    if lib.count < IVF_MIN_ROWS:
        note = exact_note(lib.count)
        return {"index": "exact", "count": lib.count, "note": note} if args.json else note
    if lib.count <= EXACT_MAX and not args.force:
        return {"index": "exact", "count": lib.count} if args.json else f"{lib.count} entries: searched exactly, no index needed"
    with lib.writer(), BarProgress("index", not args.quiet, "row") as progress:
        _, info = ensure_index(lib, persist=True, progress=progress)
    return info.to_json() if args.json else f"index {info.kind} nlist={info.nlist} nprobe={info.nprobe} recall@10={info.recall_at_10:.3f}"


def cmd_upgrade(args: argparse.Namespace) -> Any:
    from .library.upgrade import upgrade_colour

    with BarProgress("upgrade", not args.quiet, "entry") as progress:
        rep = upgrade_colour(args.library, args.images, progress=progress, batch_size=args.batch_size, workers=args.workers)
    return rep.to_json() if args.json else rep.summary()


def cmd_export(args: argparse.Namespace) -> Any:
    from .library.export import export_library
    from .library.storage import Library

    lib = Library.open(args.library)
    to_stdout = args.out in (None, "-")
    with BarProgress("export", not args.quiet and not to_stdout, "row") as progress:
        rows = export_library(lib, sys.stdout if to_stdout else args.out, args.format, clip_npy=args.clip_npy,
                              progress=progress)
    if to_stdout:
        return None
    summary = {"rows": rows, "out": args.out, "format": args.format, "clip_npy": args.clip_npy}
    return summary if args.json else f"exported {rows} rows of {lib.path} to {args.out}" + (
        f" (CLIP embeddings in {args.clip_npy})" if args.clip_npy else "")


def cmd_demo(args: argparse.Namespace) -> Any:
    from .demo import run_demo

    with BarProgress("import", not args.quiet, "img") as progress:
        summary = run_demo(args.out, count=args.count, clip_cache=args.clip_cache, progress=progress)
    if args.json:
        return summary
    lines = [f"imported {summary['import']['added']} new images into {summary['library']} ({summary['entries']} entries, CLIP {summary['clip']})"]
    for title, hits in summary["queries"].items():
        lines.append(f"{title}: seeds {[h['seed'] for h in hits]}")
    lines.append(f"contact sheet: {summary['contact_sheet']}")
    if summary["clip_is_random"]:
        lines.append("note: CLIP weights are random (offline); text rows are not meaningful — see README 'CLIP weights'.")
    return "\n".join(lines)


def _add_clip_args(p: argparse.ArgumentParser, for_import: bool) -> None:
    if for_import:
        p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, or 'none' for colour-only (default ViT-B-32)")
        p.add_argument("--clip-pretrained", default="openai", help="pretrained tag, weights file, or 'random' (default openai)")
    else:
        p.add_argument("--clip-weights", help="weights file, when the library was embedded from a local file")
    p.add_argument("--clip-config", help="open_clip model-config JSON for a custom architecture")
    p.add_argument("--clip-cache", default=str(DEFAULT_CLIP_CACHE), help=f"CLIP weight folder (default {DEFAULT_CLIP_CACHE})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--offline", action="store_true", help="never download CLIP weights")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m noisequery_core", description="NoiseQuery library tools.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, library: bool = True) -> None:
        if library:
            p.add_argument("--library", required=True, help="library folder")
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("import", help="import a folder of <seed>.<ext> images")
    p.add_argument("images", help="folder of seed-named images")
    common(p)
    _add_clip_args(p, True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--thumbnail-size", type=int, default=256, help="longer side in px, 0 = no thumbnails")
    p.add_argument("--thumbnail-format", default="webp", choices=["webp", "jpg"])
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("search", help="find seeds for a text / colour / layout requirement")
    common(p)
    _add_clip_args(p, False)
    p.add_argument("--text", help="what the image should show")
    p.add_argument("--negative", help="what it should not show")
    p.add_argument("--like-image", help="example image (CLIP and colour layout)")
    p.add_argument("--color", action="append", help="colour #RRGGBB[@weight]: how much of the image is that colour; repeat for a mix (weights = proportions)")
    for st in color.STATS:
        p.add_argument(f"--{st.name.replace('_', '-')}", dest=st.name, help=f"{st.doc}; VALUE or LO:HI, [@weight]")
    p.add_argument("--region", action="append", help=f"REGION=#RRGGBB or REGION=LIGHTNESS[@weight]; regions: {', '.join(color.REGION_NAMES)}")
    p.add_argument("--exclude", type=int, nargs="*", help="seeds to leave out")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--diversity", type=float, default=0.0, help="0..1, MMR de-duplication of the hits")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="describe a library")
    common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check a library's integrity (exit 1 if damaged)")
    common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("merge", help="merge libraries built over disjoint seed ranges")
    p.add_argument("sources", nargs="+", help="source library folders")
    p.add_argument("--into", required=True, help="destination library (created if missing)")
    common(p, library=False)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("index", help="build or update the approximate search index")
    common(p)
    p.add_argument("--force", action="store_true", help="build even for a small library")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("upgrade", help="recompute an older library's colour features for this version (resumable)")
    common(p)
    p.add_argument("--images", help="folder of the original <seed>.<ext> images (default: recompute from the thumbnails)")
    p.add_argument("--batch-size", type=int, default=256, help="entries per commit")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("export", help="every entry as a table (seed, statistics, dominant colours): csv, jsonl or parquet")
    common(p)
    p.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    p.add_argument("--out", help="output file (default: standard output; parquet needs a file)")
    p.add_argument("--clip-npy", help="also write the CLIP embeddings as float16 .npy (row i = table row i)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="run the whole pipeline on synthetic seed images (no downloads)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--count", type=int, default=300, help="number of synthetic seeds")
    p.add_argument("--clip-cache", default=str(DEFAULT_CLIP_CACHE))
    common(p, library=False)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    emit = out or (lambda s: print(s))
    try:
        result = args.func(args)
    except NoiseQueryError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # the core turns the OS errors it expects into NoiseQueryError; this is the rest
        from .library.safefs import os_error

        sys.stderr.write(f"error: {os_error(exc, exc.filename or '(unknown file)', 'use')}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: committed work is kept; run the same command again to continue\n")
        return 130
    if result is not None:  # None: the command wrote its own output (export to standard output)
        emit(json.dumps(result, indent=2, default=str) if args.json else str(result))
    return int(getattr(args, "_exit", 0))
