"""Library upkeep: verify integrity and merge libraries built in parallel over disjoint seed ranges."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LibraryError, NoiseQueryError
from ..search import color, palette
from ..work import CheckCancel, Progress, never_cancel, no_progress
from . import safefs
from .manifest import MANIFEST_NAME, read_manifest
from .storage import INDEX_DIR, LOCK_NAME, THUMB_MAX_BYTES, THUMBS_DIR, Library, check_compatible, thumbnail_problem
from .upgrade import upgrade_files

log = logging.getLogger("noisequery")

_CHUNK = 8192
_SHOW = 5  # examples named per finding
_INDEX_FILES = ("clip.faiss", "clip.json")  # kept in sync with search/index.py


def _examples(items: Sequence[object]) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    return shown + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _scan_entries(root: Path, rep: VerifyReport) -> list[tuple[str, os.stat_result]]:
    """Every entry below ``root`` (lstat, links never followed); links and special files are problems."""
    found: list[tuple[str, os.stat_result]] = []
    links: list[str] = []
    special: list[str] = []
    hard: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError as exc:  # vanished or unreadable while walking: say so rather than skip it silently
                rep.problems.append(f"{full} cannot be examined ({exc.strerror or exc}); check its permissions.")
                continue
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if stat.S_ISLNK(st.st_mode):
                links.append(rel)
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                special.append(rel)
            else:
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    hard.append(rel)
                found.append((rel, st))
    if links:
        rep.problems.append(
            f"{len(links)} symbolic links ({_examples(links)}): a NoiseQuery library never contains links, and a shared "
            "library can use them to reach files outside it. NoiseQuery refuses or skips them; delete them."
        )
    if special:
        rep.problems.append(f"{len(special)} special files (FIFOs, sockets or devices: {_examples(special)}); delete them.")
    if hard:
        rep.warnings.append(
            f"{len(hard)} files have more than one hard link ({_examples(hard)}); writers refuse to append to such "
            "column files. Copy the library with `cp -r` to break the links."
        )
    return found


def _foreign(lib: Library, entries: list[tuple[str, os.stat_result]], rep: VerifyReport) -> list[str]:
    """Report entries NoiseQuery does not write; returns the thumbnail names seen (``<seed>.<fmt>``)."""
    fmt = lib.features.thumbnail_format
    top = {MANIFEST_NAME, LOCK_NAME, THUMBS_DIR, INDEX_DIR} | {f"{c.name}.bin" for c in lib.manifest.columns}
    thumb_re = re.compile(r"^(0|[1-9][0-9]{0,19})\." + re.escape(fmt) + "$")
    foreign: list[str] = []
    temps: list[str] = []
    thumbs: list[str] = []
    upgrading = set(upgrade_files(lib))
    left_by_upgrade: list[str] = []
    for rel, st in entries:
        head, _, tail = rel.partition("/")
        name = rel.rsplit("/", 1)[-1]
        if safefs.is_own_temp(name) and stat.S_ISREG(st.st_mode):
            temps.append(rel)
        elif not tail:
            if head in upgrading and stat.S_ISREG(st.st_mode):
                left_by_upgrade.append(rel)
            elif head not in top:
                foreign.append(rel)
        elif head == THUMBS_DIR and "/" not in tail and thumb_re.match(tail) and stat.S_ISREG(st.st_mode):
            thumbs.append(tail)
        elif not (head == INDEX_DIR and tail in _INDEX_FILES and stat.S_ISREG(st.st_mode)):
            foreign.append(rel)
    if temps:
        rep.warnings.append(f"{len(temps)} temp files of an interrupted write ({_examples(temps)}); the next writer deletes them.")
    if left_by_upgrade:
        rep.warnings.append(
            f"files of an unfinished colour upgrade or of an older colour version ({_examples(left_by_upgrade)}): run "
            f"`python -m noisequery_core upgrade --library {lib.path}` to finish the upgrade and remove them."
        )
    if foreign:
        rep.warnings.append(
            f"{len(foreign)} files or folders NoiseQuery did not write ({_examples(foreign)}); they are ignored. A library "
            "from someone else should not carry them: delete them if you do not know what they are."
        )
    return thumbs


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
    """Check a library without changing it: links and foreign files, manifest, column sizes, seeds,
    values, thumbnails (read without following links, decoded only as far as the header), index.

    Never raises for a damaged or hostile library: every finding is a problem (the library is
    damaged or unsafe: ``ok`` is False) or a warning (harmless or repaired automatically).
    """
    rep = VerifyReport(str(library_dir))
    root = Path(library_dir)
    entries = _scan_entries(root, rep) if root.is_dir() else []
    try:
        lib = Library.open(library_dir)
    except LibraryError as exc:
        rep.problems.append(str(exc))
        return rep
    m = lib.manifest
    rep.count = m.count
    thumb_names = _foreign(lib, entries, rep)
    for c in m.columns:
        size = getattr(safefs.lstat(lib.path, f"{c.name}.bin"), "st_size", 0)
        extra = size - m.count * c.row_bytes
        if extra:
            rep.warnings.append(
                f"{c.name}.bin has {extra} bytes past the committed rows (an interrupted write); "
                "they are ignored and discarded by the next writer."
            )
    if m.features.color_version != color.COLOR_VERSION:
        rep.warnings.append(
            f"colour features v{m.features.color_version} (this NoiseQuery computes v{color.COLOR_VERSION}): colour queries "
            f"need an upgrade: `python -m noisequery_core upgrade --library {lib.path}`."
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
        if m.column("hist") is not None:  # colour version 1
            hist = np.asarray(lib.column("hist")[start:stop], dtype=np.float32).sum(axis=1)
            if np.any(np.abs(hist - 1) > 0.02):
                rep.problems.append(f"colour histograms in rows {start}..{stop - 1} do not sum to 1.")
        if m.column("palette") is not None:
            bad = palette.damaged_rows(lib.column("palette")[start:stop], lib.column("palette_shares")[start:stop])
            if bad.any():
                rep.problems.append(f"{int(bad.sum())} colour palettes in rows {start}..{stop - 1} are damaged (codes out of range or shares not summing to 1).")
        if lib.has_clip:
            emb = np.asarray(lib.column("clip")[start:stop], dtype=np.float32)
            norms = np.linalg.norm(emb, axis=1)
            if not np.isfinite(norms).all() or np.any(np.abs(norms - 1) > 0.01):
                rep.problems.append(f"CLIP embeddings in rows {start}..{stop - 1} are not unit vectors.")
    if m.features.thumbnail_size:
        _verify_thumbnails(lib, seeds, thumb_names, rep)
    from ..search.index import check_index

    if lib.has_clip:
        note = check_index(lib)
        if note:
            rep.warnings.append(note)
    return rep


def _verify_thumbnails(lib: Library, seeds: np.ndarray, names: list[str], rep: VerifyReport) -> None:
    have = {n.split(".", 1)[0] for n in names}
    committed = {str(int(s)) for s in seeds}
    missing = [int(s) for s in seeds if str(int(s)) not in have]
    if missing:
        rep.warnings.append(f"{len(missing)} entries have no thumbnail (e.g. seeds {missing[:_SHOW]}).")
    orphans = len(have - committed)
    if orphans:
        rep.warnings.append(f"{orphans} thumbnails belong to no committed entry (left by an interrupted write).")
    bad: list[str] = []
    for name in sorted(names):
        if name.split(".", 1)[0] not in committed:
            continue
        try:
            why = thumbnail_problem(safefs.read_bytes(lib.path, f"{THUMBS_DIR}/{name}", limit=THUMB_MAX_BYTES), lib.features)
        except LibraryError as exc:
            why = str(exc)
        if why:
            bad.append(f"{name} ({why})")
    if bad:
        rep.problems.append(
            f"{len(bad)} thumbnails are unreadable or oversized: {_examples(bad)}. Queries show a blank tile for them; "
            "delete those files (or rebuild the thumbnails by re-importing the images)."
        )


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
    check_cancel: CheckCancel = never_cancel,
) -> MergeReport:
    """Append every entry of ``sources`` into ``dest`` (created if missing).

    All libraries must share generation key and feature set (IncompatibleLibraryError
    otherwise). Seeds already in ``dest`` are skipped and counted as overlapping.
    ``progress`` (noisequery_core.work) counts source entries handled; each chunk is one commit,
    so an interrupted merge keeps what it committed and a re-run continues: ``check_cancel`` is
    called before each chunk, when every chunk before is committed.
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
                check_cancel()
                stop = min(lib.count, start + _CHUNK)
                seeds = np.asarray(lib.seeds[start:stop])
                cols = {n: np.asarray(lib.column(n)[start:stop]) for n in names}
                thumbs: list[bytes | None] = []
                for s in seeds:
                    # Never through a link, and only bytes that are a thumbnail of the destination's format and size.
                    data = None if w.has(int(s)) else lib.read_thumbnail_bytes(int(s))
                    why = thumbnail_problem(data, out.features) if data is not None else None
                    if why:
                        log.warning("merge: thumbnail of seed %d in %s not copied: %s", int(s), lib.path, why)
                        data = None
                    thumbs.append(data)
                added = w.append(seeds, cols, thumbs)
                rep.added += added
                rep.overlapping += len(seeds) - added
                done += stop - start
                progress(done, total, f"merging {lib.path.name}")
        from ..search.index import maintain_index

        maintain_index(out, progress=progress, check_cancel=check_cancel)
    return rep
