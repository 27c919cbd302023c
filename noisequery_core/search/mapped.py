"""Reading the library's memory-mapped columns into the scan's own arrays, without holding their pages twice."""

from __future__ import annotations

import mmap

import numpy as np


def release_pages(column: np.ndarray) -> None:
    """Drop a read-only column map's pages from this process's resident memory (best effort).

    The query scans keep column-major copies of the columns they read; once a copy is made, the
    mapped file pages it was read from would stay resident too and count twice in the process's
    memory. ``MADV_DONTNEED`` on a read-only shared file map only unmaps them: they stay in the page
    cache, and a later read of the map faults them back in unchanged. A no-op where the platform or
    the array (not a numpy memmap) does not allow it.
    """
    mm = getattr(column, "_mmap", None)  # set by np.memmap on the array it returns (storage.Library.column)
    advise = getattr(mm, "madvise", None)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if advise is None or dontneed is None:
        return
    try:
        advise(dontneed)
    except (OSError, ValueError):  # a closed map, or an OS that refuses: only memory is at stake
        pass


def transposed(column: np.ndarray, pick: tuple[int | slice, ...] = (), *, dtype: np.dtype | type | None = None,
               chunk: int = 1 << 18) -> np.ndarray:
    """``column[:, *pick]`` moved to row-last layout ([..., N], contiguous), read in chunks of rows.

    Reading in chunks keeps the temporaries small (a whole-column ``astype(...).T`` leaves a
    column-sized block in the allocator's heap); the map's pages are released afterwards.
    """
    n = len(column)
    key = (slice(None), *pick)
    first = np.asarray(column[:0][key], dtype=dtype)
    out = np.empty(first.shape[1:] + (n,), first.dtype)
    for s in range(0, n, chunk):
        part = np.asarray(column[s : s + chunk][key], dtype=dtype)
        out[..., s : s + len(part)] = np.moveaxis(part, 0, -1)
    release_pages(column)
    return out
