"""The build loop with an injected renderer: skipping, batching, cancel (the host's own exception), resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import solid

from noisequery_core import Cancelled, FeatureExtractor, Library, feature_set
from noisequery_core.library.build import build_seeds
from noisequery_core.library.manifest import GenerationKey
from noisequery_core.work import cancel_when


def render(seeds: list[int]):  # type: ignore[no-untyped-def]
    return [solid(((s * 40) % 256, 100, 50), 32) for s in seeds]


def make(tmp: Path) -> tuple[Library, FeatureExtractor]:
    fs = feature_set(None, thumbnail_size=16)
    lib = Library.create(tmp / "lib", GenerationKey(model="x", steps=4), fs)
    return lib, FeatureExtractor(fs, None)


def test_build_skips_existing_and_batches(tmp_path: Path) -> None:
    lib, fx = make(tmp_path)
    calls: list[list[int]] = []

    def rec(seeds: list[int]):  # type: ignore[no-untyped-def]
        calls.append(list(seeds))
        return render(seeds)

    rep = build_seeds(lib, range(0, 10), rec, fx, batch_size=4, durable=False)
    assert rep.added == 10 and calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    rep = build_seeds(lib, range(5, 15), rec, fx, batch_size=4, durable=False)
    assert rep.added == 5 and rep.already_present == 5 and calls[-2:] == [[10, 11, 12, 13], [14]]
    assert sorted(int(s) for s in Library.open(lib.path).seeds) == list(range(15))


class HostStop(Exception):
    """What a host's check_cancel raises (ComfyUI raises its own interrupt exception)."""


def test_cancel_keeps_finished_batches_and_propagates_the_hosts_exception(tmp_path: Path) -> None:
    lib, fx = make(tmp_path)
    polls = {"n": 0}

    def check_cancel() -> None:
        polls["n"] += 1
        if polls["n"] > 3:
            raise HostStop

    with pytest.raises(HostStop):
        build_seeds(lib, range(100), render, fx, batch_size=5, check_cancel=check_cancel, durable=False)
    assert Library.open(lib.path).count == 15
    rep = build_seeds(lib, range(100), render, fx, batch_size=25, durable=False)
    assert rep.added == 85 and Library.open(lib.path).count == 100


def test_cancel_when_flag_raises_cancelled(tmp_path: Path) -> None:
    lib, fx = make(tmp_path)
    stop = {"now": False}

    def rec(seeds: list[int]):  # type: ignore[no-untyped-def]
        stop["now"] = seeds[0] >= 10  # the host's flag is set while the third batch renders
        return render(seeds)

    with pytest.raises(Cancelled, match="run it again"):
        build_seeds(lib, range(40), rec, fx, batch_size=5, check_cancel=cancel_when(lambda: stop["now"]), durable=False)
    assert sorted(int(s) for s in Library.open(lib.path).seeds) == list(range(15))


def test_a_progress_that_raises_loses_no_rendered_batch(tmp_path: Path) -> None:
    """ComfyUI's progress hook raises its interrupt: the batch just rendered is committed all the same."""
    lib, fx = make(tmp_path)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int, message: str = "") -> None:
        seen.append((done, total))
        if done == 8:
            raise HostStop

    with pytest.raises(HostStop):
        build_seeds(lib, range(20), render, fx, batch_size=4, progress=progress, durable=False)
    assert seen == [(0, 20), (4, 20), (8, 20)]
    assert sorted(int(s) for s in Library.open(lib.path).seeds) == list(range(8))


def test_renderer_errors_keep_committed(tmp_path: Path) -> None:
    lib, fx = make(tmp_path)

    def flaky(seeds: list[int]):  # type: ignore[no-untyped-def]
        if seeds[0] >= 8:
            raise RuntimeError("out of memory")
        return render(seeds)

    with pytest.raises(RuntimeError, match="out of memory"):
        build_seeds(lib, range(20), flaky, fx, batch_size=4, durable=False)
    assert Library.open(lib.path).count == 8
