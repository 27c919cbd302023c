"""Export a library's rows — seed, statistics, dominant colours — as CSV, JSON Lines or Parquet, streaming.

One row per entry in library order. Columns: ``seed``, every statistic of ``search.color.STATS`` (same
names and ranges as the README's "Features"), then for colour version 2 libraries the palette sorted
by whole-image share: ``color1_hex``, ``color1_share`` … ``color8_hex``, ``color8_share`` (empty
where an image has fewer colours). CLIP embeddings go to a separate ``.npy`` (float16 [count, dim],
row i = the i-th exported row), so a table stays small. Rows are read in chunks from the
memory-mapped columns: memory stays flat at any library size.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import MissingDependencyError, NoiseQueryError
from ..search import color, palette
from ..work import CheckCancel, Progress, never_cancel, no_progress
from .storage import Library

FORMATS = ("csv", "jsonl", "parquet")
CHUNK_ROWS = 65_536


def export_columns(library: Library) -> list[str]:
    """The table's column names for ``library`` (colour columns only where it stores a palette)."""
    names = ["seed", *color.STAT_NAMES]
    if _has_palette(library):
        for i in range(1, palette.PALETTE_SIZE + 1):
            names += [f"color{i}_hex", f"color{i}_share"]
    return names


def _has_palette(library: Library) -> bool:
    have = {c.name for c in library.manifest.columns}
    return {"palette", "palette_shares"} <= have


def code_hex(codes: np.ndarray) -> np.ndarray:
    """``#RRGGBB`` of each colour code's grid-cell centre (search.palette: r·32² + g·32 + b)."""
    levels = palette.CODE_LEVELS
    c = np.asarray(codes, dtype=np.int64)
    rgb = np.stack([c // (levels * levels), (c // levels) % levels, c % levels], axis=-1)
    rgb8 = np.clip(np.round((rgb + 0.5) * 255.0 / levels), 0, 255).astype(np.int64)
    return np.array([f"#{r:02X}{g:02X}{b:02X}" for r, g, b in rgb8.reshape(-1, 3)], dtype=object).reshape(c.shape)


def iter_chunks(library: Library, chunk_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The table in chunks of ``chunk_rows`` (default CHUNK_ROWS): {column name: values}, in library row order."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    n = library.count
    seeds = library.seeds
    stats = library.column("stats")
    pal = library.column("palette") if _has_palette(library) else None
    shares = library.column("palette_shares") if pal is not None else None
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        out: dict[str, np.ndarray] = {"seed": np.asarray(seeds[start:stop], dtype=np.uint64)}
        st = np.asarray(stats[start:stop], dtype=np.float64)
        for j, name in enumerate(color.STAT_NAMES):
            out[name] = st[:, j]
        if pal is not None and shares is not None:
            codes = np.asarray(pal[start:stop, :, 0], dtype=np.int64)  # [rows, K]
            whole = np.asarray(shares[start:stop, 0, :], dtype=np.float64) / 255.0  # "whole" is region 0
            order = np.argsort(-whole, axis=1, kind="stable")
            codes = np.take_along_axis(codes, order, axis=1)
            whole = np.take_along_axis(whole, order, axis=1)
            hexes = code_hex(codes)
            for i in range(palette.PALETTE_SIZE):
                present = whole[:, i] > 0
                out[f"color{i + 1}_hex"] = np.where(present, hexes[:, i], "")
                out[f"color{i + 1}_share"] = np.where(present, np.round(whole[:, i], 4), np.nan)
        yield out


def _cell(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        f = float(v)
        return None if f != f else round(f, 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_text(library: Library, fh: IO[str], fmt: str, progress: Progress, check_cancel: CheckCancel) -> int:
    names = export_columns(library)
    writer = csv.writer(fh, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(names)
    done = 0
    for chunk in iter_chunks(library):
        check_cancel()
        cols = [chunk[n] for n in names]
        for i in range(len(chunk["seed"])):
            row = [_cell(c[i]) for c in cols]
            if writer is not None:
                writer.writerow(["" if v is None else v for v in row])
            else:
                fh.write(json.dumps(dict(zip(names, row, strict=True)), allow_nan=False) + "\n")
        done += len(chunk["seed"])
        progress(done, library.count, "rows exported")
    return done


def _write_parquet(library: Library, path: Path, progress: Progress, check_cancel: CheckCancel) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("Parquet export needs the pyarrow package: pip install pyarrow "
                                     "(or export --format csv / jsonl, which need nothing).") from None
    writer = None
    done = 0
    try:
        for chunk in iter_chunks(library):
            check_cancel()
            table = pa.table({k: (v.astype(str) if v.dtype == object else v) for k, v in chunk.items()})
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table)
            done += len(chunk["seed"])
            progress(done, library.count, "rows exported")
        if writer is None:  # an empty library still gets a file with the columns
            writer = pq.ParquetWriter(str(path), pa.schema([(n, pa.string()) for n in export_columns(library)]))
    finally:
        if writer is not None:
            writer.close()
    return done


def export_library(
    library: Library,
    out: str | os.PathLike[str] | IO[str],
    fmt: str = "csv",
    *,
    clip_npy: str | os.PathLike[str] | None = None,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
) -> int:
    """Write the library's table to ``out`` (a path, or an open text stream for csv/jsonl); returns rows written.

    A path is written to ``<out>.part`` and renamed when complete, so a stopped export never leaves a
    truncated file under the real name. ``clip_npy`` writes the CLIP embeddings (float16) beside it.
    ``progress``/``check_cancel``: noisequery_core.work (rows; checked between chunks).

    Raises NoiseQueryError for an unknown format, a parquet stream, or CLIP output from a colour-only
    library; MissingDependencyError when parquet is asked for without pyarrow.
    """
    if fmt not in FORMATS:
        raise NoiseQueryError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if clip_npy is not None and not library.has_clip:
        raise NoiseQueryError(f"{library.path} was built without CLIP (clip_model 'none'): there are no embeddings "
                              "to export; drop --clip-npy.")
    if hasattr(out, "write"):  # an open text stream (standard output)
        if fmt == "parquet":
            raise NoiseQueryError("Parquet cannot be written to standard output: give --out FILE.parquet.")
        rows = _write_text(library, out, fmt, progress, check_cancel)  # type: ignore[arg-type]
    else:
        path = Path(out)
        part = path.with_name(path.name + ".part")
        try:
            if fmt == "parquet":
                rows = _write_parquet(library, part, progress, check_cancel)
            else:
                with open(part, "w", encoding="utf-8", newline="") as fh:
                    rows = _write_text(library, fh, fmt, progress, check_cancel)
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    if clip_npy is not None:
        _write_clip(library, Path(clip_npy), check_cancel)
    return rows


def _write_clip(library: Library, path: Path, check_cancel: CheckCancel) -> None:
    emb = library.column("clip")
    part = path.with_name(path.name + ".part.npy")
    try:
        arr = np.lib.format.open_memmap(part, mode="w+", dtype=np.float16, shape=(library.count, emb.shape[1]))
        for start in range(0, library.count, CHUNK_ROWS):
            check_cancel()
            stop = min(library.count, start + CHUNK_ROWS)
            arr[start:stop] = emb[start:stop]
        arr.flush()
        del arr
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
