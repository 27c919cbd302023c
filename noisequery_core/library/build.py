"""Filling a library from a renderer: batching, skipping done seeds, overlapping features with sampling.

The renderer is injected (the ComfyUI glue passes one that samples and decodes with the
user's model), so this loop knows nothing of diffusion: it asks for images of seeds, and
while the renderer works on the next batch, a background thread computes the previous
batch's features and commits it. A cancel (noisequery_core.work) loses nothing rendered; a
crash loses at most the batches not yet committed (the one rendering and the one being committed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ..errors import NoiseQueryError
from ..search.features import FeatureExtractor
from ..search.index import maintain_index
from ..work import CheckCancel, Progress, never_cancel, no_progress
from .storage import Library

log = logging.getLogger("noisequery")

Renderer = Callable[[list[int]], Sequence[Image.Image]]


@dataclass
class BuildReport:
    requested: int = 0
    already_present: int = 0
    added: int = 0
    render_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.added} new entries ({self.already_present} of {self.requested} seeds were already in the library) "
            f"in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s"
        )


def build_seeds(
    library: Library,
    seeds: Sequence[int],
    render: Renderer,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 8,
    progress: Progress = no_progress,
    check_cancel: CheckCancel = never_cancel,
    on_batch: Callable[[list[int], Sequence[Image.Image]], None] | None = None,
    durable: bool = True,
) -> BuildReport:
    """Render and append every seed of ``seeds`` not yet in ``library``.

    Args:
        render: images for a list of seeds, in order (one per seed).
        extractor: computes the library's columns (its feature set must be the library's).
        batch_size: seeds per render call and per commit.
        progress: progress(seeds done, seeds to render) after each rendered batch (noisequery_core.work).
        check_cancel: called before each batch; whatever it raises stops the build after the batches
            already rendered are committed, and propagates (noisequery_core.work).
        on_batch: called with each rendered batch (e.g. to show a preview), after its commit is queued.
    Returns:
        a BuildReport.
    Raises:
        NoiseQueryError for a mismatched extractor or renderer; whatever ``check_cancel``, ``progress`` or
        ``render`` raise (everything rendered before is committed first, so a re-run continues).
    """
    if extractor.features != library.features:
        raise NoiseQueryError(
            f"The feature extractor computes {extractor.features.describe()} but library {library.path} stores "
            f"{library.features.describe()}; make the extractor from the library's own feature set."
        )
    rep = BuildReport(requested=len(seeds))
    t0 = time.perf_counter()
    step = max(1, batch_size)
    with library.writer(durable=durable) as writer, ThreadPoolExecutor(1, thread_name_prefix="nq-commit") as pool:
        todo = writer.missing(seeds)
        rep.already_present = len({int(s) for s in seeds}) - len(todo)
        total = len(todo)
        progress(0, total)
        pending: Future[int] | None = None

        def commit(batch: list[int], images: Sequence[Image.Image]) -> int:
            cols, thumbs = extractor(images)
            return writer.append(batch, cols, thumbs)

        try:
            for start in range(0, total, step):
                check_cancel()  # a commit still in flight is awaited below before this propagates
                batch = todo[start : start + step]
                t = time.perf_counter()
                images = list(render(batch))
                rep.render_seconds += time.perf_counter() - t
                if len(images) != len(batch):
                    raise NoiseQueryError(
                        f"The renderer returned {len(images)} images for {len(batch)} seeds ({batch[0]}..{batch[-1]}); "
                        "it must return one image per seed, in order."
                    )
                if pending is not None:  # at most one commit in flight
                    previous, pending = pending, None
                    rep.added += previous.result()
                pending = pool.submit(commit, batch, images)
                # After the commit is queued: a preview or progress hook that raises (ComfyUI's interrupt)
                # loses nothing that was rendered.
                if on_batch is not None:
                    on_batch(batch, images)
                progress(start + len(batch), total)
        except BaseException as exc:
            log.info("building %s stopped (%s); committed entries are kept, run it again to continue",
                     library.path, exc.__class__.__name__)
            raise
        finally:
            if pending is not None:
                try:
                    rep.added += pending.result()
                except Exception:
                    log.exception("committing the last batch to %s failed", library.path)
                    raise
        maintain_index(library, progress=progress, check_cancel=check_cancel)
    rep.seconds = time.perf_counter() - t0
    return rep
