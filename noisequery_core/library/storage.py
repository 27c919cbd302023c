"""The on-disk library: fixed-width column files plus a manifest whose ``count`` commits rows.

Layout of a library folder (documented in README "Library format"):

    manifest.json      schema version, generation key, feature set, columns, committed count
    seeds.bin          uint64 row → seed (faiss ids are int64, so rows, never seeds, go to faiss)
    stats.bin palette.bin palette_shares.bin layout.bin regions.bin clip.bin   one fixed-width row per entry
                       (colour columns per colour version: color.COLUMNS_BY_VERSION)
    thumbs/<seed>.webp optional thumbnails
    index/             derived search index (rebuildable; see index.py)
    .lock              writer lock (filelock)

Everything inside the folder is untrusted (libraries are shared): files are opened through
``safefs``, never through a link, and the manifest passes a strict schema (manifest.py).

Crash safety: a writer appends rows to every column file, fsyncs them, then atomically
replaces the manifest with the new count. Readers only ever look at the first ``count``
rows, so they never see a half-written entry; a writer that opens a library first cuts
every column back to ``count`` rows, discarding whatever a killed writer left behind.
A new library is assembled in a hidden sibling folder and renamed into place, so a folder
either holds a whole library or none (two processes creating the same one cannot collide).
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import filelock
import numpy as np

from ..errors import IncompatibleLibraryError, LibraryError, LibraryLockedError
from ..search import color
from . import safefs
from .manifest import (
    MANIFEST_NAME,
    ColumnSpec,
    FeatureSet,
    GenerationKey,
    Manifest,
    encode_manifest,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("noisequery")

SEED_MAX = 2**64 - 1
THUMBS_DIR = "thumbs"
INDEX_DIR = "index"  # owned by search/index.py; named here so opening a library can check it
LOCK_NAME = ".lock"
THUMB_MAX_BYTES = 8 << 20  # a 4096-px JPEG at quality 90 is ~3 MB
THUMB_FORMATS = {"webp": "WEBP", "jpg": "JPEG"}  # manifest.THUMBNAIL_FORMATS → PIL format; kept in sync


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


def _column_file(name: str) -> str:
    return f"{name}.bin"


def _enclosing_library(path: Path) -> Path | None:
    """The nearest folder above ``path`` that holds a NoiseQuery library, if any."""
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / MANIFEST_NAME).is_file() and (parent / "seeds.bin").is_file():
            return parent
    return None


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
        try:
            is_dir = p.is_dir()
        except OSError as exc:
            raise safefs.os_error(exc, p, "open the library") from None
        if not is_dir:
            if p.exists():
                raise LibraryError(
                    f"{p} is a file, not a library folder. Give the folder that holds manifest.json, seeds.bin, … "
                    "(for example the folder you passed to `import --library`)."
                )
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
        """Create a library, or open it if it exists with the same generation key and feature set.

        Creation is atomic: the library is written into a hidden sibling folder and renamed to
        ``path``; a process that loses a creation race opens the winner's library instead.
        Refuses a folder inside another library (it could never be listed or opened by name).
        """
        p = Path(path)
        if p.is_symlink():
            p = p.resolve()  # the folder itself is the caller's choice; the rename must not replace a link
        for _ in range(3):
            if os.path.lexists(p / MANIFEST_NAME):
                if not exist_ok:
                    raise LibraryError(f"A library already exists at {p}; choose another name or delete it.")
                lib = cls.open(p)
                check_compatible(f"Library {p}", lib.generation, lib.features, generation, features)
                return lib
            if os.path.lexists(p):
                if not p.is_dir():
                    raise LibraryError(f"{p} is a file, not a folder; give a new folder name for the library.")
                if any(p.iterdir()):
                    if os.path.lexists(p / MANIFEST_NAME):
                        continue  # another process just finished creating it: open that one
                    raise LibraryError(
                        f"{p} exists and is not empty but holds no NoiseQuery manifest; refusing to write into it. "
                        "Pick an empty or new folder."
                    )
            outer = _enclosing_library(p)
            if outer is not None:
                raise LibraryError(
                    f"{p} lies inside the library {outer}; a library cannot hold another one (it could not be "
                    "listed or found by name). Pick a folder outside it."
                )
            manifest = Manifest(
                generation=generation, features=features, columns=columns_for(features), count=0, created=_now(), updated=_now()
            )
            encode_manifest(manifest, p / MANIFEST_NAME)  # refuse a bad setting before anything is created
            if _create_atomically(p, manifest):
                log.info("created library %s (%s)", p, features.describe())
                return cls(p, manifest)
        raise LibraryError(f"Could not create the library {p}: other processes keep changing that folder. Try again.")

    def _check_columns(self) -> None:
        """Columns as the feature set implies, each a real file (no link) holding ``count`` rows."""
        m = self._manifest
        expected = columns_for(m.features)
        if tuple(m.columns) != expected:
            raise LibraryError(
                f"{self.path}: the manifest's columns do not match its feature set; the manifest is damaged."
            )
        # Fixed names only (checked above); a link or a folder at any of them refuses the library.
        safefs.check(self.path, THUMBS_DIR, "dir")
        safefs.check(self.path, INDEX_DIR, "dir")
        for c in m.columns:
            f = _column_path(self.path, c.name)
            st = safefs.check(self.path, _column_file(c.name), "file")
            size = st.st_size if st is not None else -1
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
            # Mapped through a no-follow descriptor; the map stays valid after the file is closed.
            with safefs.open_file(self.path, _column_file(name), "rb", doing="read") as f:
                try:
                    arr = np.memmap(f, dtype=spec.dtype, mode="r", shape=shape)
                except (ValueError, OSError) as exc:
                    raise LibraryError(
                        f"{_column_path(self.path, name)} cannot be mapped for {self.count} rows ({exc}); it was "
                        "truncated after the library was opened. Run `python -m noisequery_core verify --library …`."
                    ) from None
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

    def _thumbnail_rel(self, seed: int) -> str:
        # thumbnail_format passed the manifest's allow-list; the seed is an integer.
        return f"{THUMBS_DIR}/{int(seed)}.{self.features.thumbnail_format}"

    def thumbnail_path(self, seed: int) -> Path | None:
        """The seed's thumbnail file when it is a regular file reached without links, else None."""
        if not self.features.thumbnail_size:
            return None
        return safefs.regular_file(self.path, self._thumbnail_rel(seed))

    def read_thumbnail_bytes(self, seed: int) -> bytes | None:
        """The seed's encoded thumbnail (never read through a link); None if missing or refused (logged)."""
        if not self.features.thumbnail_size:
            return None
        rel = self._thumbnail_rel(seed)
        try:
            if safefs.lstat(self.path, rel) is None:
                return None
            return safefs.read_bytes(self.path, rel, limit=THUMB_MAX_BYTES)
        except LibraryError as exc:
            log.warning("thumbnail of seed %d skipped: %s", int(seed), exc)
            return None

    def load_thumbnail(self, seed: int) -> Any:
        """The seed's thumbnail as an RGB PIL image, or None when missing, unsafe or undecodable (logged)."""
        data = self.read_thumbnail_bytes(seed)
        if data is None:
            return None
        try:
            return decode_thumbnail(data, self.features)
        except ValueError as exc:
            log.warning("thumbnail %s skipped: %s", self.path / self._thumbnail_rel(seed), exc)
            return None

    def writer(self, *, durable: bool = True) -> LibraryWriter:
        """The single appending writer (takes the library's lock; use as a context manager)."""
        return LibraryWriter(self, durable=durable)

    def info(self) -> dict[str, Any]:
        m = self._manifest
        sizes = {c.name: getattr(safefs.lstat(self.path, _column_file(c.name)), "st_size", 0) for c in m.columns}
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
    """Exclusive, non-blocking writer lock on ``<library>/.lock`` (filelock: flock / msvcrt).

    The OS releases it when the holding process dies, so a crashed writer never blocks the next.
    """

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK_NAME
        self._lock: filelock.BaseFileLock | None = None

    def acquire(self) -> None:
        # filelock opens the path itself (older versions with O_TRUNC, following links): make
        # sure first that .lock is a plain file inside the library, never a link or a folder.
        os.close(safefs.open_fd(self.root, LOCK_NAME, os.O_RDWR | os.O_CREAT, doing="create the writer lock"))
        lock = filelock.FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LibraryLockedError(
                f"Library {self.root} is being written by another process (lock {self.path}). "
                "Wait for that build/import to finish or stop it; a crashed writer releases the lock automatically."
            ) from None
        except OSError as exc:
            raise safefs.os_error(exc, self.path, "take the writer lock") from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


class LibraryWriter:
    """Appends whole entries to a library; every ``append`` is one atomic commit."""

    def __init__(self, library: Library, *, durable: bool = True):
        self.library = library
        self.durable = durable
        self._lock = _Lock(library.path)
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
                f = safefs.open_file(lib.path, _column_file(c.name), "r+b", doing="open for writing")
                self._files[c.name] = f
                committed = m.count * c.row_bytes
                if os.fstat(f.fileno()).st_size != committed:
                    log.warning("%s: discarding uncommitted tail of %s.bin left by an interrupted writer", lib.path, c.name)
                    try:
                        f.truncate(committed)
                    except OSError as exc:
                        raise safefs.os_error(exc, _column_path(lib.path, c.name), "cut back") from None
                f.seek(committed)
            self._seen = {int(s) for s in np.asarray(lib.seeds)}
            # Temp files of interrupted writers: only names this package gives its temp files.
            for folder in ("", THUMBS_DIR, INDEX_DIR):
                safefs.remove_own_temps(lib.path, folder)
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
                    write_thumbnail(data, lib.path, seed_list[i], m.features)
        name = ""
        try:
            for c in m.columns:
                name = c.name
                data = np.ascontiguousarray(rows[c.name], dtype=np.dtype(c.dtype)).tobytes()
                f = self._files[c.name]
                f.write(data)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
        except OSError as exc:
            self._rollback()
            raise safefs.os_error(exc, _column_path(lib.path, name), "append to") from None
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
        try:
            write_manifest(lib.path, new, durable=self.durable)
        except BaseException:
            self._rollback()
            raise
        lib._manifest = new
        lib._cache.clear()
        self._seen.update(batch_seen)
        return len(keep)

    def _rollback(self) -> None:
        """After a failed append: cut every column back to the committed rows (best effort), so a
        later append in this writer cannot commit rows behind a partial write, and space is freed."""
        m = self.library.manifest
        for c in m.columns:
            f = self._files.get(c.name)
            if f is None:
                continue
            committed = m.count * c.row_bytes
            try:
                f.truncate(committed)
                f.seek(committed)
            except (OSError, ValueError):
                log.warning("could not cut %s.bin back to its committed rows; the next writer will", c.name)

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


def decode_thumbnail(data: bytes, features: FeatureSet) -> Any:
    """Decode a stored thumbnail to an RGB PIL image; ValueError saying why when it is not one.

    Only the library's own format is decoded, and an image larger than the library's
    thumbnail size is refused from its header, before any pixels are decoded (a
    decompression bomb is a few KB on disk).
    """
    from PIL import Image, UnidentifiedImageError

    fmt = THUMB_FORMATS.get(features.thumbnail_format)
    if fmt is None:
        raise ValueError(f"thumbnail format {features.thumbnail_format!r} is not supported")
    side = max(int(features.thumbnail_size), 1)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size
            if max(w, h) > side:
                raise ValueError(
                    f"it is {w}×{h} pixels, larger than the library's {side}-pixel thumbnails (refused unread: it "
                    "could be a decompression bomb)"
                )
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        raise ValueError(f"it is not a readable {fmt} image ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def thumbnail_problem(data: bytes, features: FeatureSet) -> str | None:
    """Why ``data`` is not a usable thumbnail (header and size only, no pixel decoding), or None."""
    from PIL import Image, UnidentifiedImageError

    fmt = THUMB_FORMATS.get(features.thumbnail_format, "?")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        return f"not a readable {fmt} image ({exc.__class__.__name__})"
    if max(w, h) > max(int(features.thumbnail_size), 1):
        return f"{w}×{h} pixels, larger than the library's {features.thumbnail_size}-pixel thumbnails"
    return None


def write_thumbnail(data: bytes, root: Path, seed: int, features: FeatureSet) -> Path:
    """Write one thumbnail into ``root/thumbs`` (atomic, no-follow; the format is allow-listed)."""
    if features.thumbnail_format not in THUMB_FORMATS:
        raise LibraryError(f"thumbnail format {features.thumbnail_format!r} is not one of {', '.join(THUMB_FORMATS)}.")
    safefs.ensure_dir(root, THUMBS_DIR)
    rel = f"{THUMBS_DIR}/{int(seed)}.{features.thumbnail_format}"
    # Thumbnails are written before the rows commit; a crash leaves at worst an orphan file
    # that the resumed run overwrites, so no fsync per file is needed here.
    safefs.atomic_write(root, rel, data, durable=False)
    return root / rel


def _create_atomically(path: Path, manifest: Manifest) -> bool:
    """Assemble an empty library in a hidden sibling folder and rename it to ``path``.

    Returns False when another process created ``path`` first (the caller then opens it).
    """
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise safefs.os_error(exc, parent, "create the folder") from None
    tmp = parent / safefs.temp_name(path.name)
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise safefs.os_error(exc, parent, "create a library in") from None
    try:
        for c in manifest.columns:
            safefs.open_file(tmp, _column_file(c.name), "xb", doing="create").close()
        if manifest.features.thumbnail_size:
            safefs.ensure_dir(tmp, THUMBS_DIR)
        write_manifest(tmp, manifest)
        if os.name == "nt" and path.is_dir():
            try:
                os.rmdir(path)  # Windows cannot rename onto an (empty) folder
            except OSError:
                pass
        try:
            os.rename(tmp, path)  # POSIX: replaces an empty folder, fails on a non-empty one
        except OSError as exc:
            # Lost a race (the caller opens the winner's library) or a foreign folder appeared
            # (the caller refuses it with its usual message).
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or os.path.lexists(path / MANIFEST_NAME):
                return False
            raise safefs.os_error(exc, path, "create the library") from None
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # only what this function created
    safefs.fsync_dir(parent)
    return True


__all__ = [
    "Library",
    "LibraryWriter",
    "columns_for",
    "check_compatible",
    "decode_thumbnail",
    "encode_thumbnail",
    "thumbnail_problem",
    "SEED_MAX",
]
