"""Upgrade a library's colour features to this NoiseQuery's colour version: crash-safe and resumable.

The columns that the new colour version adds are computed for every row, from the stored
thumbnails or from the original images, into ``<column>.bin.upgrade`` files next to the live
ones. After every batch those files are fsynced and ``upgrade.json`` records how many rows
they hold (atomic replace), so a killed upgrade resumes at its last batch. At the end the new
files take their final names and ONE atomic manifest replace switches the library to the new
version; only then are the columns of the old version deleted. Until that replace readers see
the old version, after it the new one: a library never holds two colour versions, and a
``kill -9`` at any moment leaves a library that opens (old or new) and an upgrade that resumes.

The upgrade holds the library's writer lock throughout, so no import or build runs meanwhile.
Columns the two versions share (statistics, layout, regions, CLIP) are left untouched.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import Cancelled, LibraryError
from ..search import color
from .ingest import ImportReport, scan_folder
from .manifest import ColumnSpec, FeatureSet, Manifest, atomic_write_bytes, fsync_dir, write_manifest
from .storage import Library, columns_for

log = logging.getLogger("noisequery")

STATE_NAME = "upgrade.json"
STATE_FORMAT = "noisequery-colour-upgrade"
TMP_SUFFIX = ".upgrade"


@dataclass
class UpgradeReport:
    path: str
    from_version: int
    to_version: int
    rows: int = 0
    computed: int = 0  # rows computed by this run (the rest were done by an interrupted run)
    from_originals: int = 0
    from_thumbnails: int = 0
    removed: tuple[str, ...] = ()  # files of the old version deleted after the switch

    def summary(self) -> str:
        if self.from_version == self.to_version and not self.computed:
            extra = f"; removed leftovers {', '.join(self.removed)}" if self.removed else ""
            return f"{self.path}: colour features already v{self.to_version} ({self.rows} entries){extra}"
        resumed = f", {self.rows - self.computed} done by an earlier run" if self.computed < self.rows else ""
        return (
            f"{self.path}: colour features v{self.from_version} → v{self.to_version} for {self.rows} entries "
            f"({self.from_originals} from original images, {self.from_thumbnails} from thumbnails{resumed})"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tmp_path(lib: Library, name: str) -> Path:
    return lib.path / f"{name}.bin{TMP_SUFFIX}"


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _read_state(lib: Library) -> dict[str, Any] | None:
    try:
        d = json.loads((lib.path / STATE_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable %s (%s); the upgrade starts over", lib.path, STATE_NAME, exc)
        return None
    return d if isinstance(d, dict) and d.get("format") == STATE_FORMAT else None


def _write_state(lib: Library, state: dict[str, Any], durable: bool) -> None:
    data = json.dumps(state, indent=2).encode("utf-8")
    if durable:
        atomic_write_bytes(lib.path / STATE_NAME, data)
    else:
        tmp = lib.path / f".{STATE_NAME}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, lib.path / STATE_NAME)


def _remove_leftovers(lib: Library) -> tuple[str, ...]:
    """Files of an earlier colour version, or of a finished/abandoned upgrade, that the manifest does not name."""
    live = {f"{c.name}.bin" for c in lib.manifest.columns}
    names: set[str] = set()
    for version in color.COLUMNS_BY_VERSION:
        names.update(f"{name}.bin" for name, _, _ in color.COLUMNS_BY_VERSION[version])
    removed = []
    for fname in sorted(names - live):
        for p in (lib.path / fname, lib.path / f"{fname}{TMP_SUFFIX}"):
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)  # another process may be tidying up too
                removed.append(p.name)
    state = _read_state(lib)
    if (lib.path / STATE_NAME).is_file() and (state is None or int(state.get("to_version", 0)) <= color.COLOR_VERSION):
        (lib.path / STATE_NAME).unlink(missing_ok=True)  # never the record of a newer NoiseQuery's upgrade
        removed.append(STATE_NAME)
    if removed:
        fsync_dir(lib.path)
    return tuple(removed)


def _check_cancel(check_cancel: Callable[[], object] | None, lib: Library, done: int) -> None:
    # Works with both contracts: a check_cancel that raises, or one that returns True to stop.
    if check_cancel is not None and check_cancel():
        raise Cancelled(f"Colour upgrade of {lib.path} stopped after {done} entries; run it again to continue.")


def upgrade_colour(
    library: Library | str | os.PathLike[str],
    images_folder: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], object] | None = None,
    batch_size: int = 256,
    workers: int = 2,
    durable: bool = True,
) -> UpgradeReport:
    """Recompute a library's colour columns for this NoiseQuery's colour version (color.COLOR_VERSION).

    Args:
        library: the library (or its folder).
        images_folder: folder of the original ``<seed>.<ext>`` images; rows whose original is
            not there use their thumbnail. None: every row uses its thumbnail.
        progress: progress(rows done, rows) after each committed batch (starts at the rows an
            interrupted run already did).
        check_cancel: called after each committed batch; raising (or returning True) stops the
            upgrade, which a later call resumes.
        batch_size: rows per progress commit.
        workers: threads decoding images and computing colours.
        durable: fsync every commit (False only for tests and benchmarks).
    Returns:
        an UpgradeReport. On an up-to-date library it only removes files an earlier upgrade left.
    Raises:
        LibraryError when a row has neither an original nor a readable thumbnail (nothing is
        switched; the rows done so far are kept for the next run), LibraryLockedError while
        another process writes the library, Cancelled / whatever check_cancel raises.
    """
    lib = library if isinstance(library, Library) else Library.open(library)
    with lib.writer(durable=durable):  # the writer lock: no import, build or other upgrade meanwhile
        m = lib.manifest
        old_version, new_version = m.features.color_version, color.COLOR_VERSION
        rep = UpgradeReport(str(lib.path), old_version, new_version, rows=m.count)
        if old_version != new_version:
            _upgrade_locked(lib, m, rep, images_folder, progress, check_cancel, batch_size, workers, durable)
    # After the lock is released: the writer held the old column files open, which Windows cannot delete.
    rep.removed = _remove_leftovers(lib)
    if rep.computed or old_version != new_version:
        log.info("%s", rep.summary())
    return rep


def _upgrade_locked(
    lib: Library,
    m: Manifest,
    rep: UpgradeReport,
    images_folder: str | os.PathLike[str] | None,
    progress: Callable[[int, int], None] | None,
    check_cancel: Callable[[], object] | None,
    batch_size: int,
    workers: int,
    durable: bool,
) -> None:
    """The upgrade proper, under the writer lock: compute the new columns, then switch."""
    old_version, new_version = rep.from_version, rep.to_version
    if old_version > new_version:  # Library.open already refuses unknown versions; a downgrade is never done
        raise LibraryError(f"{lib.path} has colour features v{old_version}, newer than this NoiseQuery's v{new_version}.")
    new_features = dataclasses.replace(m.features, color_version=new_version)
    new_columns = columns_for(new_features)
    old_specs = {c.name: c for c in m.columns}
    todo = [c for c in new_columns if old_specs.get(c.name) != c]  # columns the new version adds or changes
    changed = [c.name for c in todo if c.name in old_specs]
    if changed:  # would be rewritten in place, which readers of the old version would see; versions so far only add columns
        raise LibraryError(f"Upgrading {lib.path} to colour v{new_version} would rewrite columns {changed} in place; not supported.")
    sources = _sources(lib, images_folder)
    _compute(lib, todo, sources, rep, progress, check_cancel, batch_size, workers, durable)
    _switch(lib, m, new_features, new_columns, todo)


def _sources(lib: Library, images_folder: str | os.PathLike[str] | None) -> list[tuple[Path, bool]]:
    """(image path, is original) per row; raises LibraryError naming rows that have neither."""
    originals: dict[int, Path] = {}
    if images_folder is not None:
        originals = dict(scan_folder(Path(images_folder), ImportReport()))
    out: list[tuple[Path, bool]] = []
    missing: list[int] = []
    for seed in (int(s) for s in np.asarray(lib.seeds)):
        if seed in originals:
            out.append((originals[seed], True))
            continue
        thumb = lib.thumbnail_path(seed)
        if thumb is None:
            missing.append(seed)
            out.append((Path(), False))
        else:
            out.append((thumb, False))
    if missing:
        where = f"in {images_folder}" if images_folder is not None else "(no --images folder given)"
        thumbs = "has no thumbnails" if not lib.features.thumbnail_size else "lacks their thumbnails"
        raise LibraryError(
            f"Cannot upgrade {lib.path}: {len(missing)} entries (seeds {missing[:5]}{' …' if len(missing) > 5 else ''}) have no "
            f"original image {where} and the library {thumbs}. Pass the folder of the original <seed>.<ext> images with "
            "`--images <folder>` (images_folder=...), then run the upgrade again."
        )
    return out


def _compute(
    lib: Library,
    todo: Sequence[ColumnSpec],
    sources: list[tuple[Path, bool]],
    rep: UpgradeReport,
    progress: Callable[[int, int], None] | None,
    check_cancel: Callable[[], object] | None,
    batch_size: int,
    workers: int,
    durable: bool,
) -> None:
    """Fill ``<column>.bin.upgrade`` for every row, resuming from upgrade.json; commits per batch."""
    total = len(sources)
    key = {"format": STATE_FORMAT, "to_version": color.COLOR_VERSION, "columns": [c.to_json() for c in todo]}
    state = _read_state(lib)
    done = int(state.get("rows_done", 0)) if state is not None and all(state.get(k) == v for k, v in key.items()) else 0
    done = min(max(done, 0), total)
    for c in todo:
        tmp, final = _tmp_path(lib, c.name), lib.path / f"{c.name}.bin"
        if not tmp.exists() and final.exists() and done:  # killed between the renames of a finished run
            os.replace(final, tmp)
        if not tmp.exists() or tmp.stat().st_size < done * c.row_bytes:
            done = 0  # the record promises rows the file does not hold: start over
    files: dict[str, IO[bytes]] = {}
    try:
        for c in todo:
            f = open(_tmp_path(lib, c.name), "a+b")
            f.truncate(done * c.row_bytes)  # drop whatever a killed run wrote after its last commit
            f.seek(done * c.row_bytes)
            files[c.name] = f
        if done:
            log.info("%s: resuming the colour upgrade at row %d of %d", lib.path, done, total)
        if progress:
            progress(done, total)
        names = [c.name for c in todo]
        analyse = color.analyse_palette if set(names) <= set(color.UPGRADED_COLUMNS) else color.analyse_one

        def work(src: tuple[Path, bool]) -> dict[str, np.ndarray]:
            try:
                return analyse(color.prepare(_load_rgb(src[0])))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                kind = "original image" if src[1] else "thumbnail"
                raise LibraryError(
                    f"Cannot read the {kind} {src[0]} while upgrading {lib.path} ({exc.__class__.__name__}: {exc}). "
                    "Replace the file, or pass the original images with `--images <folder>`, and run the upgrade again "
                    "(finished rows are kept)."
                ) from None

        step = max(1, int(batch_size))
        with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="nq-upgrade") as pool:
            for start in range(done, total, step):
                batch = sources[start : start + step]
                rows = list(pool.map(work, batch))
                for c in todo:
                    data = np.ascontiguousarray(np.stack([r[c.name] for r in rows]), dtype=np.dtype(c.dtype))
                    out = files[c.name]
                    out.write(data.tobytes())
                    out.flush()
                    if durable:
                        os.fsync(out.fileno())
                done = start + len(batch)
                rep.computed += len(batch)
                rep.from_originals += sum(1 for _, orig in batch if orig)
                rep.from_thumbnails += sum(1 for _, orig in batch if not orig)
                _write_state(lib, {**key, "rows_done": done, "rows": total}, durable)  # the commit
                if progress:
                    progress(done, total)
                if done < total:
                    _check_cancel(check_cancel, lib, done)
    finally:
        for fh in files.values():
            fh.close()


def _switch(lib: Library, m: Manifest, new_features: FeatureSet, new_columns: tuple[ColumnSpec, ...], todo: Sequence[ColumnSpec]) -> None:
    """Give the new columns their names, then switch the manifest: the one atomic step of the upgrade."""
    for c in todo:
        os.replace(_tmp_path(lib, c.name), lib.path / f"{c.name}.bin")
    fsync_dir(lib.path)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    notes = {**m.notes, "colour_upgrade": {"from": m.features.color_version, "to": new_features.color_version, "at": now, "rows": m.count}}
    write_manifest(lib.path, dataclasses.replace(m, features=new_features, columns=new_columns, updated=now, notes=notes))
    lib.refresh()
