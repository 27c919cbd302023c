"""The on-disk library: fixed-width column files plus a manifest whose ``count`` commits rows.

Layout of a library folder (documented in README "Library format"):

    manifest.json      schema version, generation key, feature set, columns, committed count
    seeds.bin          uint64 row → seed (faiss ids are int64, so rows, never seeds, go to faiss)
    stats.bin palette.bin palette_shares.bin layout.bin regions.bin clip.bin   one fixed-width row per entry
                       (colour columns per colour version: color.COLUMNS_BY_VERSION)
    thumbs/<seed>.webp optional thumbnails
    index/             derived search index (rebuildable; see index.py)
    .lock              writer lock

Crash safety: a writer appends rows to every column file, fsyncs them, then atomically
replaces the manifest with the new count. Readers only ever look at the first ``count``
rows, so they never see a half-written entry; a writer that opens a library first cuts
every column back to ``count`` rows, discarding whatever a killed writer left behind.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import IncompatibleLibraryError, LibraryError, LibraryLockedError
from ..search import color
from .manifest import (
    ColumnSpec,
    FeatureSet,
    GenerationKey,
    Manifest,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("noisequery")

SEED_MAX = 2**64 - 1
THUMBS_DIR = "thumbs"
LOCK_NAME = ".lock"


def columns_for(features: FeatureSet) -> tuple[ColumnSpec, ...]:
    """Column specs implied by a feature set (seeds first)."""
    cols = [ColumnSpec("seeds", "<u8", ())]
    # The colour columns depend on the colour version; an unknown (newer) version raises LibraryError.
    cols += [ColumnSpec(name, dtype, shape) for name, dtype, shape in color.columns_of_version(features.color_version)]
    if features.clip is not None:
        cols.append(ColumnSpec("clip", "<f2", (features.clip.dim,)))
    return tuple(cols)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _column_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.bin"


def check_compatible(
    where: str,
    a_gen: GenerationKey,
    a_feat: FeatureSet,
    b_gen: GenerationKey,
    b_feat: FeatureSet,
    *,
    check_thumbnails: bool = False,
) -> None:
    """Raise IncompatibleLibraryError naming the first differing field."""
    if a_gen != b_gen:
        diffs = [
            f"{k}: {va!r} ≠ {vb!r}"
            for k, va in a_gen.to_json().items()
            if (vb := b_gen.to_json().get(k)) != va
        ]
        raise IncompatibleLibraryError(
            f"{where}: generation keys differ ({'; '.join(diffs)}). Seeds only mean the same image under the "
            "same model, latent size, noise and sampler settings: build into a new library name instead."
        )
    a_cmp = (a_feat.clip, a_feat.color_version) if not check_thumbnails else a_feat
    b_cmp = (b_feat.clip, b_feat.color_version) if not check_thumbnails else b_feat
    if a_cmp != b_cmp:
        fix = "Use the same CLIP model and NoiseQuery version for both, or build into a new library."
        if a_feat.color_version != b_feat.color_version:  # a library never holds two colour versions
            fix = (
                "Colour features differ: upgrade the older library first with "
                "`python -m noisequery_core upgrade --library <folder>` (see README 'Upgrading a library')."
            )
        raise IncompatibleLibraryError(f"{where}: feature sets differ ({a_feat.describe()} vs {b_feat.describe()}). {fix}")


class Library:
    """Read access to a library folder; ``writer()`` gives the single appending writer."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self._manifest = manifest
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Library:
        """Open an existing library. Raises LibraryError / SchemaVersionError."""
        p = Path(path)
        if not p.is_dir():
            raise LibraryError(
                f"No NoiseQuery library at {p}: the folder does not exist. Check the name, or create it by "
                "importing images (`python -m noisequery_core import …`) or with the BuildNoiseLibrary node."
            )
        lib = cls(p, read_manifest(p))
        lib._check_columns()
        return lib

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        generation: GenerationKey,
        features: FeatureSet,
        *,
        exist_ok: bool = True,
    ) -> Library:
        """Create a library, or open it if it exists with the same generation key and feature set."""
        p = Path(path)
        if (p / "manifest.json").exists():
            if not exist_ok:
                raise LibraryError(f"A library already exists at {p}; choose another name or delete it.")
            lib = cls.open(p)
            check_compatible(f"Library {p}", lib.generation, lib.features, generation, features)
            return lib
        if p.exists() and any(p.iterdir()):
            raise LibraryError(
                f"{p} exists and is not empty but holds no NoiseQuery manifest; refusing to write into it. "
                "Pick an empty or new folder."
            )
        p.mkdir(parents=True, exist_ok=True)
        columns = columns_for(features)
        for c in columns:
            _column_path(p, c.name).touch()
        if features.thumbnail_size:
            (p / THUMBS_DIR).mkdir(exist_ok=True)
        manifest = Manifest(generation=generation, features=features, columns=columns, count=0, created=_now(), updated=_now())
        write_manifest(p, manifest)
        log.info("created library %s (%s)", p, features.describe())
        return cls(p, manifest)

    def _check_columns(self) -> None:
        m = self._manifest
        expected = columns_for(m.features)
        if tuple(m.columns) != expected:
            raise LibraryError(
                f"{self.path}: the manifest's columns do not match its feature set; the manifest is damaged."
            )
        for c in m.columns:
            f = _column_path(self.path, c.name)
            size = f.stat().st_size if f.exists() else -1
            if size < m.count * c.row_bytes:
                raise LibraryError(
                    f"{f} holds {max(size, 0) // max(c.row_bytes, 1)} rows but the manifest commits {m.count}; "
                    "the library is damaged (a file was truncated or deleted). Run `python -m noisequery_core "
                    "verify --library …` and restore the file from a backup, or rebuild the library."
                )

    def refresh(self) -> bool:
        """Re-read the manifest; returns True when new entries were committed since."""
        m = read_manifest(self.path)
        changed = m.count != self._manifest.count
        columns_changed = m.columns != self._manifest.columns  # e.g. a colour upgrade swapped columns
        self._manifest = m
        if changed or columns_changed:
            self._cache.clear()
        return changed

    # ------------------------------------------------------------ properties

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def count(self) -> int:
        return self._manifest.count

    def __len__(self) -> int:
        return self._manifest.count

    @property
    def generation(self) -> GenerationKey:
        return self._manifest.generation

    @property
    def features(self) -> FeatureSet:
        return self._manifest.features

    @property
    def has_clip(self) -> bool:
        return self._manifest.features.clip is not None

    def column(self, name: str) -> np.ndarray:
        """Committed rows of a column as a read-only memory map (shape [count, *row_shape])."""
        key = f"col:{name}"
        arr = self._cache.get(key)
        if arr is not None:
            return arr
        spec = self._manifest.column(name)
        if spec is None:
            raise LibraryError(f"Library {self.path} has no '{name}' column (features: {self.features.describe()}).")
        shape = (self.count, *spec.shape)
        if self.count == 0:
            arr = np.zeros(shape, dtype=spec.dtype)
        else:
            arr = np.memmap(_column_path(self.path, name), dtype=spec.dtype, mode="r", shape=shape)
        self._cache[key] = arr
        return arr

    @property
    def seeds(self) -> np.ndarray:
        return self.column("seeds")

    def _sorted_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        got = self._cache.get("sorted")
        if got is None:
            seeds = np.asarray(self.seeds)
            order = np.argsort(seeds, kind="stable")
            got = (seeds[order], order)
            self._cache["sorted"] = got
        return got

    def rows_of(self, seeds: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row index of each seed, −1 where the seed is not in the library."""
        q = np.asarray(seeds, dtype=np.uint64).reshape(-1)
        s, order = self._sorted_seeds()
        if len(s) == 0:
            return np.full(q.shape, -1, dtype=np.int64)
        pos = np.searchsorted(s, q)
        pos_c = np.minimum(pos, len(s) - 1)
        found = s[pos_c] == q
        return np.where(found, order[pos_c], -1).astype(np.int64)

    def contains(self, seeds: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.rows_of(seeds) >= 0

    def thumbnail_path(self, seed: int) -> Path | None:
        if not self.features.thumbnail_size:
            return None
        p = self.path / THUMBS_DIR / f"{int(seed)}.{self.features.thumbnail_format}"
        return p if p.exists() else None

    def writer(self, *, durable: bool = True) -> LibraryWriter:
        """The single appending writer (takes the library's lock; use as a context manager)."""
        return LibraryWriter(self, durable=durable)

    def info(self) -> dict[str, Any]:
        m = self._manifest
        sizes = {c.name: _column_path(self.path, c.name).stat().st_size for c in m.columns}
        seeds = np.asarray(self.seeds)
        return {
            "path": str(self.path),
            "schema_version": m.schema_version,
            "count": m.count,
            "seed_min": int(seeds.min()) if len(seeds) else None,
            "seed_max": int(seeds.max()) if len(seeds) else None,
            "created": m.created,
            "updated": m.updated,
            "generation": m.generation.to_json(),
            "features": m.features.to_json(),
            "column_bytes": sizes,
            "notes": m.notes,
        }


class _Lock:
    """Exclusive, non-blocking advisory lock on a file; released by the OS if the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: IO[bytes] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt

                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            else:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise LibraryLockedError(
                f"Library {self.path.parent} is being written by another process (lock {self.path}). "
                "Wait for that build/import to finish or stop it; a crashed writer releases the lock automatically."
            ) from None
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            if os.name == "nt":
                import msvcrt

                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
            else:
                import fcntl

                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None


class LibraryWriter:
    """Appends whole entries to a library; every ``append`` is one atomic commit."""

    def __init__(self, library: Library, *, durable: bool = True):
        self.library = library
        self.durable = durable
        self._lock = _Lock(library.path / LOCK_NAME)
        self._files: dict[str, IO[bytes]] = {}
        self._seen: set[int] | None = None

    def __enter__(self) -> LibraryWriter:
        self._lock.acquire()
        try:
            lib = self.library
            lib.refresh()
            lib._check_columns()
            m = lib.manifest
            for c in m.columns:
                f = open(_column_path(lib.path, c.name), "r+b")
                committed = m.count * c.row_bytes
                if os.fstat(f.fileno()).st_size != committed:
                    log.warning("%s: discarding uncommitted tail of %s.bin left by an interrupted writer", lib.path, c.name)
                    f.truncate(committed)
                f.seek(committed)
                self._files[c.name] = f
            self._seen = {int(s) for s in np.asarray(lib.seeds)}
            thumbs = lib.path / THUMBS_DIR
            if thumbs.is_dir():
                for tmp in thumbs.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._lock.release()

    def has(self, seed: int) -> bool:
        assert self._seen is not None, "use the writer as a context manager"
        return int(seed) in self._seen

    def missing(self, seeds: Sequence[int]) -> list[int]:
        """The seeds (in order, de-duplicated) that are not yet in the library."""
        assert self._seen is not None, "use the writer as a context manager"
        out: list[int] = []
        seen_here: set[int] = set()
        for s in seeds:
            s = int(s)
            if s not in self._seen and s not in seen_here:
                seen_here.add(s)
                out.append(s)
        return out

    def append(
        self,
        seeds: Sequence[int] | np.ndarray,
        columns: dict[str, np.ndarray],
        thumbnails: Sequence[Any] | None = None,
    ) -> int:
        """Commit a batch of entries; seeds already present are skipped. Returns the number added.

        ``columns`` maps every non-seed column name to an array with one row per seed;
        ``thumbnails`` (optional) holds encoded thumbnail bytes (see ``encode_thumbnail``) or
        None per seed; they are written before the commit.
        """
        if self._seen is None:
            raise RuntimeError("LibraryWriter.append outside its `with` block")
        lib = self.library
        m = lib.manifest
        seed_list = [int(s) for s in np.asarray(seeds, dtype=np.uint64).reshape(-1)] if len(seeds) else []
        for s in seed_list:
            if s < 0 or s > SEED_MAX:
                raise LibraryError(f"Seed {s} is outside ComfyUI's range 0..{SEED_MAX}.")
        keep = []
        batch_seen: set[int] = set()
        for i, s in enumerate(seed_list):
            if s in self._seen or s in batch_seen:
                continue
            batch_seen.add(s)
            keep.append(i)
        if not keep:
            return 0
        idx = np.asarray(keep, dtype=np.int64)
        rows: dict[str, np.ndarray] = {"seeds": np.asarray([seed_list[i] for i in keep], dtype=np.uint64)}
        for c in m.columns:
            if c.name == "seeds":
                continue
            if c.name not in columns:
                raise LibraryError(f"append to {lib.path}: column '{c.name}' missing from the batch.")
            arr = np.asarray(columns[c.name])
            if arr.shape != (len(seed_list), *c.shape):
                raise LibraryError(
                    f"append to {lib.path}: column '{c.name}' has shape {arr.shape}, expected "
                    f"{(len(seed_list), *c.shape)}."
                )
            rows[c.name] = arr[idx]
        if thumbnails is not None and m.features.thumbnail_size:
            for i in keep:
                data = thumbnails[i]
                if data is not None:
                    write_thumbnail(data, lib.path / THUMBS_DIR, seed_list[i], m.features)
        for c in m.columns:
            data = np.ascontiguousarray(rows[c.name], dtype=np.dtype(c.dtype)).tobytes()
            f = self._files[c.name]
            f.write(data)
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        new = Manifest(
            generation=m.generation,
            features=m.features,
            columns=m.columns,
            count=m.count + len(keep),
            created=m.created,
            updated=_now(),
            schema_version=m.schema_version,
            notes=m.notes,
        )
        write_manifest(lib.path, new)
        lib._manifest = new
        lib._cache.clear()
        self._seen.update(batch_seen)
        return len(keep)

    def set_notes(self, **notes: Any) -> None:
        """Merge ``notes`` into the manifest's free-form notes (atomic)."""
        lib = self.library
        m = lib.manifest
        new = Manifest(
            generation=m.generation,
            features=m.features,
            columns=m.columns,
            count=m.count,
            created=m.created,
            updated=_now(),
            schema_version=m.schema_version,
            notes={**m.notes, **notes},
        )
        write_manifest(lib.path, new)
        lib._manifest = new


def encode_thumbnail(image: Any, features: FeatureSet) -> bytes | None:
    """Encode a PIL image as the library's thumbnail (longer side ≤ thumbnail_size); None if disabled."""
    import io

    from PIL import Image

    if not features.thumbnail_size:
        return None
    im = image if image.mode == "RGB" else image.convert("RGB")
    if max(im.size) > features.thumbnail_size:
        im = im.copy()
        im.thumbnail((features.thumbnail_size, features.thumbnail_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if features.thumbnail_format.lower() == "webp":
        im.save(buf, format="WEBP", quality=85, method=4)
    else:
        im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_thumbnail(data: bytes, folder: Path, seed: int, features: FeatureSet) -> Path:
    path = folder / f"{int(seed)}.{features.thumbnail_format.lower()}"
    # Thumbnails are written before the rows commit; a crash leaves at worst an orphan file
    # that the resumed run overwrites, so no directory fsync per file is needed here.
    tmp = folder / f".{int(seed)}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


__all__ = [
    "Library",
    "LibraryWriter",
    "columns_for",
    "check_compatible",
    "encode_thumbnail",
    "SEED_MAX",
]
