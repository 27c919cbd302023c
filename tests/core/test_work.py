"""One contract for long work (noisequery_core.work), checked on every long-running core function.

For each: progress goes 0 -> total in order, and an exception raised by check_cancel (the host's own, as
ComfyUI's interrupt is) comes out unchanged, after the work finished so far was kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import solid
from helpers_lib import make_library

from noisequery_core import Cancelled, FeatureExtractor, Library, feature_set, import_folder, merge
from noisequery_core.directions.noiseclr import TrainSettings, checkpoint_path_for, load_directions, train_directions
from noisequery_core.exploration.rank import embed_images
from noisequery_core.library.build import build_seeds
from noisequery_core.library.manifest import GenerationKey
from noisequery_core.search.index import ensure_index
from noisequery_core.work import cancel_when, never_cancel, no_progress


class HostStop(Exception):
    """Stands for a host's own stop exception."""


class PixelEmbedder:
    """Just enough of ClipEmbedder for embed_images: the mean colour as a 3-wide embedding."""

    def preprocess(self, im: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, np.float32).mean(axis=(0, 1)))

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return pixels.numpy()


def _images(n: int) -> list[Any]:
    return [solid((i * 10 % 256, 50, 200), 16) for i in range(n)]


def run_build(tmp: Path, progress: Any, check_cancel: Any) -> None:
    fs = feature_set(None, thumbnail_size=0)
    lib = Library.create(tmp / "lib", GenerationKey(model="x"), fs)
    build_seeds(lib, range(12), lambda seeds: _images(len(seeds)), FeatureExtractor(fs, None), batch_size=4,
                progress=progress, check_cancel=check_cancel, durable=False)


def run_import(tmp: Path, progress: Any, check_cancel: Any) -> None:
    src = tmp / "imgs"
    src.mkdir(exist_ok=True)
    for s, im in enumerate(_images(10)):
        im.save(src / f"{s}.png")
    import_folder(src, tmp / "lib", embedder=None, thumbnail_size=0, batch_size=3, workers=1, durable=False,
                  progress=progress, check_cancel=check_cancel)


def run_merge(tmp: Path, progress: Any, check_cancel: Any) -> None:
    a = make_library(tmp / "a", list(range(0, 30)), dim=None)
    b = make_library(tmp / "b", list(range(30, 50)), dim=None)
    merge([a.path, b.path], tmp / "m", progress=progress)


def run_index(tmp: Path, progress: Any, check_cancel: Any) -> None:
    lib = make_library(tmp / "lib", list(range(3000)), dim=16)
    ensure_index(lib, persist=False, progress=progress)


def run_embed(tmp: Path, progress: Any, check_cancel: Any) -> None:
    embed_images(PixelEmbedder(), _images(10), batch=4, progress=progress, check_cancel=check_cancel)


def run_train(tmp: Path, progress: Any, check_cancel: Any) -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 2, 4, 4, generator=g)
    empty = torch.randn(6, 8, generator=g)
    proj = torch.randn(8, 2, generator=g)

    def predict_noise(x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x * 0.1 + (ctx.mean(dim=1) @ proj).view(-1, 2, 1, 1)

    settings = TrainSettings(num_directions=3, directions_per_iteration=2, iterations=7, batch_size=2, token_count=3,
                             checkpoint_every=100)
    train_directions(latents, empty, predict_noise, torch.linspace(0.1, 10, 1000), settings,
                     checkpoint_path=checkpoint_path_for(tmp / "d.safetensors"), progress=progress,
                     check_cancel=check_cancel)


RUNS = {"build": run_build, "import": run_import, "merge": run_merge, "index": run_index, "embed_images": run_embed,
        "train_directions": run_train}
CANCELLABLE = ("build", "import", "embed_images", "train_directions")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_progress_goes_from_zero_to_total(name: str, tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    RUNS[name](tmp_path, lambda done, total, message="": seen.append((done, total, message)), never_cancel)
    assert seen, f"{name} reported no progress"
    total = seen[-1][1]
    assert total > 0 and seen[-1][0] == total, seen[-3:]
    assert seen[0][0] == 0, seen[:3]
    dones = [d for d, t, _ in seen if t == total]
    assert dones == sorted(dones), f"{name}: progress went backwards: {dones}"
    assert all(isinstance(m, str) for _, _, m in seen)


# What is on disk after the third check_cancel raised: two units of work (batches, iterations) finished.
KEPT: dict[str, Callable[[Path], int]] = {
    "build": lambda tmp: Library.open(tmp / "lib").count,  # two batches of 4 committed
    "import": lambda tmp: Library.open(tmp / "lib").count,  # two batches of 3 committed
    "train_directions": lambda tmp: load_directions(checkpoint_path_for(tmp / "d.safetensors")).iterations_done,
}
EXPECTED_KEPT = {"build": 8, "import": 6, "train_directions": 2}


@pytest.mark.parametrize("name", CANCELLABLE)
def test_the_hosts_exception_comes_out_unchanged_after_finished_work_is_kept(name: str, tmp_path: Path) -> None:
    calls = {"n": 0}

    def check_cancel() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise HostStop

    with pytest.raises(HostStop):
        RUNS[name](tmp_path, no_progress, check_cancel)
    if name in KEPT:
        assert KEPT[name](tmp_path) == EXPECTED_KEPT[name]


def test_cancel_when_raises_cancelled_once_the_flag_is_set() -> None:
    flag = {"stop": False}
    check = cancel_when(lambda: flag["stop"], "the import into /x")
    check()  # not set: returns
    flag["stop"] = True
    with pytest.raises(Cancelled, match="the import into /x was stopped.*run it again"):
        check()


def test_defaults_do_nothing() -> None:
    assert no_progress(1, 2, "x") is None and never_cancel() is None
