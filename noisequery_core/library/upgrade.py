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
Columns the two versions share (statistics, layout, regions, CLIP) are left untouched. Files
inside the library are opened through ``safefs`` (never through a link), like every writer's.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import LibraryError
from ..imaging import load_image
from ..search import color
from ..work import CheckCancel, Progress, never_cancel, no_progress
from . import safefs
from .ingest import ImportReport, scan_folder
from .manifest import ColumnSpec, FeatureSet, Manifest, write_manifest
from .storage import THUMBS_DIR, Library, columns_for, decode_thumbnail

log = logging.getLogger("noisequery")

STATE_NAME = "upgrade.json"
STATE_FORMAT = "noisequery-colour-upgrade"
TMP_SUFFIX = ".upgrade"
_STATE_MAX_BYTES = 1 << 16


@dataclass
class UpgradeReport:
    path: str
    from_version: int
    to_version: int
    rows: int = 0
    computed: int = 0  # rows computed by this run (the rest were done by an interrupted run)
    from_originals: int = 0
    from_thumbnails: int = 0
    removed: tuple[str, ...] = ()  # files of an old version or a finished upgrade, deleted after the switch

    def summary(self) -> str:
        if self.from_version == self.to_version:
            extra = f"; removed leftovers {', '.join(self.removed)}" if self.removed else ""
            return f"{self.path}: colour features already v{self.to_version} ({self.rows} entries){extra}"
        resumed = f", {self.rows - self.computed} done by an earlier run" if self.computed < self.rows else ""
        return (
            f"{self.path}: colour features v{self.from_version} → v{self.to_version} for {self.rows} entries "
            f"({self.from_originals} from original images, {self.from_thumbnails} from thumbnails{resumed})"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tmp_name(name: str) -> str:
    return f"{name}.bin{TMP_SUFFIX}"


def _known_column_files() -> set[str]:
    """``<name>.bin`` of every colour column of every colour version this code knows."""
    return {f"{name}.bin" for cols in color.COLUMNS_BY_VERSION.values() for name, _, _ in cols}


def upgrade_files(lib: Library) -> list[str]:
    """Files of an unfinished upgrade or of an older colour version that the manifest does not name."""
    live = {f"{c.name}.bin" for c in lib.manifest.columns}
    names = sorted(_known_column_files() - live)
    candidates = [STATE_NAME, *names, *(f"{n}{TMP_SUFFIX}" for n in names)]
    return [n for n in candidates if safefs.lstat(lib.path, n) is not None]


def _read_state(lib: Library) -> dict[str, Any] | None:
    if safefs.lstat(lib.path, STATE_NAME) is None:
        return None
    try:
        d = json.loads(safefs.read_bytes(lib.path, STATE_NAME, limit=_STATE_MAX_BYTES))
    except (LibraryError, ValueError) as exc:  # a damaged record only costs the rows it counted
        log.warning("%s: unusable %s (%s); the upgrade starts over", lib.path, STATE_NAME, exc)
        return None
    return d if isinstance(d, dict) and d.get("format") == STATE_FORMAT else None


def _remove_leftovers(lib: Library) -> tuple[str, ...]:
    """Delete the files ``upgrade_files`` lists: regular, single-link files only (never a link or folder),
    and never the record of an upgrade to a newer version than this code's."""
    state = _read_state(lib)
    removed = []
    for name in upgrade_files(lib):
        if name == STATE_NAME and state is not None and int(state.get("to_version", 0)) > color.COLOR_VERSION:
            continue
        st = safefs.lstat(lib.path, name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            continue
        try:
            (lib.path / name).unlink()
        except FileNotFoundError:  # another process tidied up first
            continue
        except OSError as exc:
            raise safefs.os_error(exc, lib.path / name, "delete the leftover file") from None
        removed.append(name)
    if removed:
        safefs.fsync_dir(lib.path)
    return tuple(removed)


def upgrade_colour(
    library: Library | str | os.PathLike[str],
    images_folder: str | os.PathLike[str] | None = None,
    *,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
    batch_size: int = 256,
    workers: int = 2,
    durable: bool = True,
) -> UpgradeReport:
    """Recompute a library's colour columns for this NoiseQuery's colour version (color.COLOR_VERSION).

    Args:
        library: the library (or its folder).
        images_folder: folder of the original ``<seed>.<ext>`` images; rows whose original is
            not there use their thumbnail. None: every row uses its thumbnail.
        progress: progress(rows done, rows) after each committed batch, starting at the rows an
            interrupted run already did (noisequery_core.work).
        check_cancel: called after each committed batch; whatever it raises stops the upgrade
            and propagates, and a later call resumes (noisequery_core.work).
        batch_size: rows per commit.
        workers: threads decoding images and computing colours.
        durable: fsync every commit (False only for tests and benchmarks).
    Returns:
        an UpgradeReport. On an up-to-date library it only removes files an earlier upgrade left.
    Raises:
        LibraryError when a row has neither an original nor a readable thumbnail (nothing is
        switched; the rows done so far are kept for the next run), LibraryLockedError while
        another process writes the library, and whatever check_cancel or progress raise.
    """
    lib = library if isinstance(library, Library) else Library.open(library)
    with lib.writer(durable=durable):  # the writer lock: no import, build or other upgrade meanwhile
        m = lib.manifest
        rep = UpgradeReport(str(lib.path), m.features.color_version, color.COLOR_VERSION, rows=m.count)
        if rep.from_version != rep.to_version:
            _upgrade_locked(lib, m, rep, images_folder, progress, check_cancel, batch_size, workers, durable)
    # After the lock is released: the writer held the old column files open, which Windows cannot delete.
    rep.removed = _remove_leftovers(lib)
    if rep.from_version != rep.to_version:
        log.info("%s", rep.summary())
    return rep


def _upgrade_locked(
    lib: Library,
    m: Manifest,
    rep: UpgradeReport,
    images_folder: str | os.PathLike[str] | None,
    progress: Progress,
    check_cancel: CheckCancel,
    batch_size: int,
    workers: int,
    durable: bool,
) -> None:
    """The upgrade proper, under the writer lock: compute the new columns, then switch."""
    if rep.from_version > rep.to_version:  # Library.open already refuses unknown versions; a downgrade is never done
        raise LibraryError(f"{lib.path} has colour features v{rep.from_version}, newer than this NoiseQuery's v{rep.to_version}.")
    new_features = dataclasses.replace(m.features, color_version=rep.to_version)
    new_columns = columns_for(new_features)
    old_specs = {c.name: c for c in m.columns}
    todo = [c for c in new_columns if old_specs.get(c.name) != c]  # columns the new version adds or changes
    changed = [c.name for c in todo if c.name in old_specs]
    if changed:  # would be rewritten in place, which readers of the old version would see; versions so far only add columns
        raise LibraryError(f"Upgrading {lib.path} to colour v{rep.to_version} would rewrite columns {changed} in place; not supported.")
    sources = _sources(lib, images_folder)
    _compute(lib, todo, sources, rep, progress, check_cancel, batch_size, workers, durable)
    _switch(lib, m, new_features, new_columns, todo, durable)


def _sources(lib: Library, images_folder: str | os.PathLike[str] | None) -> list[tuple[Path | int, bool]]:
    """Per row: (original image path, True) or (seed, False) for its thumbnail; LibraryError naming rows with neither."""
    originals: dict[int, Path] = {}
    if images_folder is not None:
        originals = dict(scan_folder(Path(images_folder), ImportReport()))
    out: list[tuple[Path | int, bool]] = []
    missing: list[int] = []
    for seed in (int(s) for s in np.asarray(lib.seeds)):
        if seed in originals:
            out.append((originals[seed], True))
        else:
            if lib.thumbnail_path(seed) is None:  # a regular file reached without links, or nothing
                missing.append(seed)
            out.append((seed, False))
    if missing:
        where = f"in {images_folder}" if images_folder is not None else "(no --images folder given)"
        thumbs = "has no thumbnails" if not lib.features.thumbnail_size else "lacks their thumbnails"
        raise LibraryError(
            f"Cannot upgrade {lib.path}: {len(missing)} entries (seeds {missing[:5]}{' …' if len(missing) > 5 else ''}) have no "
            f"original image {where} and the library {thumbs}. Pass the folder of the original <seed>.<ext> images with "
            "`--images <folder>` (images_folder=...), then run the upgrade again."
        )
    return out


def _open_tmp(lib: Library, c: ColumnSpec) -> IO[bytes]:
    fd = safefs.open_fd(lib.path, _tmp_name(c.name), os.O_RDWR | os.O_CREAT, doing="write the upgraded column")
    if os.fstat(fd).st_nlink != 1:  # writing would change the other names too (see safefs.open_file)
        os.close(fd)
        raise LibraryError(f"{lib.path / _tmp_name(c.name)} has several hard links; delete it and run the upgrade again.")
    return os.fdopen(fd, "r+b")


def _compute(
    lib: Library,
    todo: Sequence[ColumnSpec],
    sources: list[tuple[Path | int, bool]],
    rep: UpgradeReport,
    progress: Progress,
    check_cancel: CheckCancel,
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
        tmp, final = _tmp_name(c.name), f"{c.name}.bin"
        st = safefs.check(lib.path, tmp, "file")
        if st is None and done and safefs.check(lib.path, final, "file") is not None:
            try:  # killed between the renames of a finished run
                os.replace(lib.path / final, lib.path / tmp)
            except OSError as exc:
                raise safefs.os_error(exc, lib.path / final, "resume the upgrade of") from exc
            st = safefs.check(lib.path, tmp, "file")
        if st is None or st.st_size < done * c.row_bytes:
            done = 0  # the record promises rows the file does not hold: start over
    files: dict[str, IO[bytes]] = {}
    try:
        for c in todo:
            f = files[c.name] = _open_tmp(lib, c)
            f.truncate(done * c.row_bytes)  # drop whatever a killed run wrote after its last commit
            f.seek(done * c.row_bytes)
        if done:
            log.info("%s: resuming the colour upgrade at row %d of %d", lib.path, done, total)
        progress(done, total)
        names = [c.name for c in todo]
        analyse = color.analyse_palette if set(names) <= set(color.UPGRADED_COLUMNS) else color.analyse_one

        def work(src: tuple[Path | int, bool]) -> dict[str, np.ndarray]:
            where, original = src
            try:
                if isinstance(where, Path):  # an original image (the folder the caller gave), decoded as seen
                    image = load_image(where)
                else:
                    data = lib.read_thumbnail_bytes(where)
                    if data is None:
                        raise ValueError("it is missing, a link or too large")
                    image = decode_thumbnail(data, lib.features)
                return analyse(color.prepare(image))
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                what = f"original image {where}" if original else f"thumbnail {lib.path / THUMBS_DIR}/{where}.{lib.features.thumbnail_format}"
                raise LibraryError(
                    f"Cannot read the {what} while upgrading {lib.path} ({exc.__class__.__name__}: {exc}). "
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
                state_bytes = json.dumps({**key, "rows_done": done, "rows": total}, indent=2).encode("utf-8")
                safefs.atomic_write(lib.path, STATE_NAME, state_bytes, durable=durable)  # the commit
                progress(done, total)
                if done < total:
                    check_cancel()  # every row so far is committed
    finally:
        for fh in files.values():
            fh.close()


def _switch(lib: Library, m: Manifest, new_features: FeatureSet, new_columns: tuple[ColumnSpec, ...],
            todo: Sequence[ColumnSpec], durable: bool) -> None:
    """Give the new columns their names, then switch the manifest: the one atomic step of the upgrade."""
    for c in todo:
        safefs.check(lib.path, _tmp_name(c.name), "file", missing_ok=False)
        try:
            os.replace(lib.path / _tmp_name(c.name), lib.path / f"{c.name}.bin")
        except OSError as exc:
            raise safefs.os_error(exc, lib.path / f"{c.name}.bin", "rename the upgraded column") from None
    safefs.fsync_dir(lib.path)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    notes = {**m.notes, "colour_upgrade": {"from": m.features.color_version, "to": new_features.color_version, "at": now, "rows": m.count}}
    write_manifest(lib.path, dataclasses.replace(m, features=new_features, columns=new_columns, updated=now, notes=notes), durable=durable)
    lib.refresh()
