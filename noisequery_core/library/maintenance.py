"""Library upkeep: verify integrity and merge libraries built in parallel over disjoint seed ranges."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LibraryError, NoiseQueryError
from ..work import Progress, no_progress
from .manifest import read_manifest
from .storage import THUMBS_DIR, Library, check_compatible

log = logging.getLogger("noisequery")

_CHUNK = 8192


@dataclass
class VerifyReport:
    path: str
    count: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "ok": self.ok, "count": self.count, "problems": self.problems, "warnings": self.warnings}


def verify(library_dir: str | os.PathLike[str]) -> VerifyReport:
    """Check a library without changing it: manifest, column sizes, seeds, values, thumbnails, index."""
    rep = VerifyReport(str(library_dir))
    try:
        lib = Library.open(library_dir)
    except LibraryError as exc:
        rep.problems.append(str(exc))
        return rep
    m = lib.manifest
    rep.count = m.count
    for c in m.columns:
        size = (lib.path / f"{c.name}.bin").stat().st_size
        extra = size - m.count * c.row_bytes
        if extra:
            rep.warnings.append(
                f"{c.name}.bin has {extra} bytes past the committed rows (an interrupted write); "
                "they are ignored and discarded by the next writer."
            )
    seeds = np.asarray(lib.seeds)
    uniq, counts = np.unique(seeds, return_counts=True)
    if len(uniq) != len(seeds):
        dup = uniq[counts > 1][:5].tolist()
        rep.problems.append(f"{len(seeds) - len(uniq)} duplicate seed rows (e.g. {dup}).")
    for start in range(0, m.count, _CHUNK):
        stop = min(m.count, start + _CHUNK)
        stats = np.asarray(lib.column("stats")[start:stop], dtype=np.float32)
        if not np.isfinite(stats).all():
            rep.problems.append(f"non-finite statistics in rows {start}..{stop - 1}.")
        hist = np.asarray(lib.column("hist")[start:stop], dtype=np.float32).sum(axis=1)
        if np.any(np.abs(hist - 1) > 0.02):
            rep.problems.append(f"colour histograms in rows {start}..{stop - 1} do not sum to 1.")
        if lib.has_clip:
            emb = np.asarray(lib.column("clip")[start:stop], dtype=np.float32)
            norms = np.linalg.norm(emb, axis=1)
            if not np.isfinite(norms).all() or np.any(np.abs(norms - 1) > 0.01):
                rep.problems.append(f"CLIP embeddings in rows {start}..{stop - 1} are not unit vectors.")
    if m.features.thumbnail_size:
        folder = lib.path / THUMBS_DIR
        have = {p.stem for p in folder.glob(f"*.{m.features.thumbnail_format}")} if folder.is_dir() else set()
        missing = [int(s) for s in seeds if str(int(s)) not in have]
        if missing:
            rep.warnings.append(f"{len(missing)} entries have no thumbnail (e.g. seeds {missing[:5]}).")
        orphans = len(have - {str(int(s)) for s in seeds})
        if orphans:
            rep.warnings.append(f"{orphans} thumbnails belong to no committed entry (left by an interrupted write).")
    from ..search.index import load_index

    if lib.has_clip and (lib.path / "index").exists():
        got = load_index(lib)
        if got is None:
            rep.warnings.append("the search index is unreadable or stale; it will be rebuilt on the next write.")
        elif got[1].ntotal < m.count:
            rep.warnings.append(f"the search index covers {got[1].ntotal} of {m.count} entries; searches catch up in memory.")
    return rep


@dataclass
class MergeReport:
    added: int = 0
    overlapping: int = 0
    sources: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"added": self.added, "overlapping_seeds_skipped": self.overlapping, "sources": self.sources}


def merge(
    sources: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    progress: Progress = no_progress,
) -> MergeReport:
    """Append every entry of ``sources`` into ``dest`` (created if missing).

    All libraries must share generation key and feature set (IncompatibleLibraryError
    otherwise). Seeds already in ``dest`` are skipped and counted as overlapping.
    ``progress`` (noisequery_core.work) counts source entries handled; each chunk is one commit,
    so an interrupted merge keeps what it committed and a re-run continues.
    """
    if not sources:
        raise NoiseQueryError("merge needs at least one source library.")
    libs = [Library.open(s) for s in sources]
    first = libs[0]
    for other in libs[1:]:
        check_compatible(f"Cannot merge {other.path} with {first.path}", first.generation, first.features, other.generation, other.features)
    dest_path = Path(dest)
    if any(dest_path.resolve() == lib.path.resolve() for lib in libs):
        raise NoiseQueryError(f"The merge destination {dest_path} is also a source; pick a new folder.")
    if (dest_path / "manifest.json").exists():
        d = read_manifest(dest_path)
        check_compatible(f"Cannot merge into {dest_path}", d.generation, d.features, first.generation, first.features)
        if d.features.thumbnail_format != first.features.thumbnail_format:
            raise NoiseQueryError(f"Thumbnail formats differ between {dest_path} and {first.path}.")
    out = Library.create(dest_path, first.generation, first.features)
    rep = MergeReport(sources=[str(lib.path) for lib in libs])
    total = sum(lib.count for lib in libs)
    done = 0
    names = [c.name for c in out.manifest.columns if c.name != "seeds"]
    progress(0, total)
    with out.writer() as w:
        for lib in libs:
            for start in range(0, lib.count, _CHUNK):
                stop = min(lib.count, start + _CHUNK)
                seeds = np.asarray(lib.seeds[start:stop])
                cols = {n: np.asarray(lib.column(n)[start:stop]) for n in names}
                thumbs: list[bytes | None] = []
                for s in seeds:
                    p = lib.thumbnail_path(int(s))
                    thumbs.append(p.read_bytes() if p is not None and not w.has(int(s)) else None)
                added = w.append(seeds, cols, thumbs)
                rep.added += added
                rep.overlapping += len(seeds) - added
                done += stop - start
                progress(done, total, f"merging {lib.path.name}")
        from ..search.index import maintain_index

        maintain_index(out)
    return rep
