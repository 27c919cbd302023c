"""Export throughput and memory at scale: a synthetic library of N rows → csv / jsonl / parquet (+ CLIP .npy).

``.venv/bin/python bench/bench_export.py --rows 1000000``. Prints seconds, file sizes, the rows read back
(csv and parquet, seeds compared) and the peak RSS before and after the exports (the exports stream in
chunks, so the peak stays what building the synthetic library took).
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "core")]

from helpers_lib import make_library  # noqa: E402

from noisequery_core.library import export as ex  # noqa: E402
from noisequery_core.library.storage import Library  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="nq-export-"))
    make_library(d / "lib", np.arange(args.rows, dtype=np.uint64))
    lib = Library.open(d / "lib")
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    for fmt in ex.FORMATS:
        out = d / f"rows.{fmt}"
        t = time.perf_counter()
        rows = ex.export_library(lib, out, fmt, clip_npy=d / "clip.npy" if fmt == "csv" else None)
        print(f"{fmt:8s} {rows} rows in {time.perf_counter() - t:.1f} s, {out.stat().st_size / 1e6:.0f} MB")
    with open(d / "rows.csv", newline="") as fh:
        back = sum(1 for _ in csv.reader(fh)) - 1
    print(f"csv rows read back: {back}")
    try:
        import pyarrow.parquet as pq

        seeds = np.asarray(pq.read_table(d / "rows.parquet")["seed"]).astype(np.uint64)
        print(f"parquet rows read back: {len(seeds)}, seeds equal: {np.array_equal(seeds, np.asarray(lib.seeds))}")
    except ImportError:
        print("parquet not read back (pyarrow missing)")
    print(f"peak RSS before / after the exports: {peak0} / {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
