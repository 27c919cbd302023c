"""Import a folder of seed-named images (``1.jpg``, ``45920.png``) into a library.

Decoding, colour features, thumbnails and CLIP preprocessing run in worker threads while
the main thread runs the CLIP model on the previous batch; each batch is one commit, so an
interruption loses at most the batch in flight and a re-run continues where it stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import NoiseQueryError
from ..imaging import ImageDecodeError, load_image
from ..search.clip import ClipEmbedder
from ..search.features import FeatureExtractor, Prepared, feature_set
from ..search.index import maintain_index
from ..work import CheckCancel, Progress, never_cancel, no_progress
from .manifest import GenerationKey
from .storage import SEED_MAX, Library

log = logging.getLogger("noisequery")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_REPORT_FIRST = 5


def parse_seed_name(name: str) -> int | None:
    """Seed encoded in a file name (``'45920.png'`` → 45920), or None if the stem is not a seed."""
    stem, suffix = os.path.splitext(name)
    if suffix.lower() not in IMAGE_SUFFIXES or not stem.isdigit() or not stem.isascii():
        return None
    value = int(stem)
    return value if value <= SEED_MAX else None


@dataclass
class ImportReport:
    files: int = 0
    added: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def summary(self) -> str:
        s = f"{self.files} files: {self.added} imported, {self.already_present} already in the library"
        if self.skipped:
            first = "; ".join(f"{n} ({r})" for n, r in self.skipped[:_REPORT_FIRST])
            more = f" and {len(self.skipped) - _REPORT_FIRST} more" if len(self.skipped) > _REPORT_FIRST else ""
            s += f", {len(self.skipped)} skipped: {first}{more}"
        return s

    def to_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "added": self.added,
            "already_present": self.already_present,
            "skipped": len(self.skipped),
            "skipped_first": [{"file": n, "reason": r} for n, r in self.skipped[:_REPORT_FIRST]],
        }


def scan_folder(folder: Path, report: ImportReport) -> list[tuple[int, Path]]:
    """Seed-named image files in ``folder`` (not recursive), sorted by seed; others go to the report."""
    if not folder.is_dir():
        raise NoiseQueryError(f"Image folder {folder} does not exist or is not a folder.")
    found: dict[int, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        report.files += 1
        seed = parse_seed_name(entry.name)
        if seed is None:
            report.skipped.append((entry.name, "name is not <seed>.<png|jpg|webp|…> with seed 0..2^64-1"))
        elif seed in found:
            report.skipped.append((entry.name, f"duplicate of {found[seed].name}"))
        else:
            found[seed] = Path(entry.path)
    return sorted(found.items())


def import_folder(
    images_dir: str | os.PathLike[str],
    library_dir: str | os.PathLike[str],
    *,
    embedder: ClipEmbedder | None,
    generation: GenerationKey | None = None,
    thumbnail_size: int = 256,
    thumbnail_format: str = "webp",
    batch_size: int = 32,
    workers: int = 2,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
    durable: bool = True,
) -> ImportReport:
    """Import seed-named images into a library (created if needed); idempotent and resumable.

    Args:
        images_dir: folder of ``<seed>.<ext>`` images.
        library_dir: library folder; created with this feature set if missing.
        embedder: CLIP model for image embeddings, or None for a colour-only library.
        generation: generation key to record (default: imported/unknown).
        batch_size: entries per commit (and per CLIP forward pass).
        workers: decoding/feature threads working ahead of the model.
        progress: progress(files done, files to import) after each batch (noisequery_core.work).
        check_cancel: called between batches, when every batch before is committed; whatever it
            raises stops the import and propagates (noisequery_core.work).
    Returns:
        an ImportReport.
    Raises:
        NoiseQueryError for a missing folder, LibraryError / IncompatibleLibraryError for library
        problems, and whatever ``check_cancel`` or ``progress`` raise (committed batches are kept).
    """
    report = ImportReport()
    files = scan_folder(Path(images_dir), report)
    features = feature_set(embedder, thumbnail_size=thumbnail_size, thumbnail_format=thumbnail_format)
    lib = Library.create(library_dir, generation or GenerationKey(), features)
    extractor = FeatureExtractor(lib.features, embedder)
    with lib.writer(durable=durable) as writer:
        todo = [(s, p) for s, p in files if not writer.has(s)]
        report.already_present = len(files) - len(todo)
        total = len(todo)
        progress(0, total)
        batches = [todo[i : i + max(1, batch_size)] for i in range(0, total, max(1, batch_size))]
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nq-import") as pool:

            def work(item: tuple[int, Path]) -> Prepared | str:
                try:
                    return extractor.prepare(load_image(item[1]))  # upright, 8-bit by the file's real range
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageDecodeError) as exc:
                    return f"unreadable: {exc.__class__.__name__}: {exc}"[:200]

            def submit(batch: list[tuple[int, Path]]) -> list[Future[Prepared | str]]:
                return [pool.submit(work, item) for item in batch]

            pending: Iterator[list[tuple[int, Path]]] = iter(batches)
            inflight: list[tuple[list[tuple[int, Path]], list[Future[Prepared | str]]]] = []
            for _ in range(2):  # keep two batches decoding ahead of the model
                b = next(pending, None)
                if b is not None:
                    inflight.append((b, submit(b)))
            try:
                while inflight:
                    check_cancel()  # every batch before this one is committed
                    batch, futures = inflight.pop(0)
                    nxt = next(pending, None)
                    if nxt is not None:
                        inflight.append((nxt, submit(nxt)))
                    ok_seeds: list[int] = []
                    ok_prep: list[Prepared] = []
                    for (seed, path), fut in zip(batch, futures):
                        res = fut.result()
                        if isinstance(res, str):
                            report.skipped.append((path.name, res))
                        else:
                            ok_seeds.append(seed)
                            ok_prep.append(res)
                    if ok_prep:
                        cols, thumbs = extractor.finish(ok_prep)
                        report.added += writer.append(ok_seeds, cols, thumbs)
                    done += len(batch)
                    progress(done, total)
            except BaseException as exc:
                log.info("import into %s stopped (%s) after %d new entries; they are kept, run it again to continue",
                         lib.path, exc.__class__.__name__, report.added)
                raise
            finally:
                for _, futures in inflight:
                    for f in futures:
                        f.cancel()
        writer.set_notes(last_import=report.to_json())
        maintain_index(lib, progress=progress, check_cancel=check_cancel)
    if report.skipped:
        log.warning("import into %s: %s", lib.path, report.summary())
    return report
