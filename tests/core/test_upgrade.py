"""Colour upgrade: an old library answers what it can, upgrades from thumbnails or originals, resumes after any crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEmbedder
from PIL import Image

from noisequery_core import (
    Cancelled,
    IncompatibleLibraryError,
    Library,
    LibraryError,
    Query,
    QueryError,
    RegionTarget,
    Searcher,
    StatTarget,
)
from noisequery_core.cli import main
from noisequery_core.library import upgrade as upgrade_mod
from noisequery_core.library.ingest import import_folder
from noisequery_core.library.maintenance import merge, verify
from noisequery_core.library.manifest import FeatureSet, GenerationKey
from noisequery_core.library.storage import encode_thumbnail
from noisequery_core.library.upgrade import STATE_NAME, upgrade_colour
from noisequery_core.search import color

ROOT = Path(__file__).resolve().parents[2]
COLOURS = [(255, 136, 0), (30, 80, 200), (30, 140, 40), (128, 128, 128), (240, 240, 240), (120, 60, 20)]
SHARED = ("seeds", "stats", "layout", "regions", "clip")  # columns both colour versions have


def picture(i: int, size: int = 96) -> Image.Image:
    """Top part one colour, bottom another, with a little texture; entry i is mostly COLOURS[i % 6]."""
    rng = np.random.default_rng(i)
    a = np.empty((size, size, 3), np.float32)
    a[: size * 3 // 4] = COLOURS[i % len(COLOURS)]
    a[size * 3 // 4 :] = COLOURS[(i + 1 + i // len(COLOURS)) % len(COLOURS)]
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def v1_library(path: Path, n: int = 24, *, thumbs: int = 64, originals: Path | None = None) -> Library:
    """A library as colour version 1 wrote it (64-bin histogram column), with fake-CLIP rows and thumbnails."""
    fs = FeatureSet(clip=FakeEmbedder().identity, color_version=1, thumbnail_size=thumbs)
    lib = Library.create(path, GenerationKey(model="m"), fs)
    images = [picture(i) for i in range(n)]
    rows = [color.analyse_one(color.prepare(im)) for im in images]  # stats/layout/regions: same formulas in v1
    hist = np.zeros((n, 64), np.float16)
    hist[:, 0] = 1.0
    cols = {name: np.stack([r[name] for r in rows]) for name in ("stats", "layout", "regions")}
    cols["hist"] = hist
    cols["clip"] = np.stack([FakeEmbedder.vector(w) for w in ("orange", "blue", "green", "white", "white", "red")] * (n // 6 + 1))[:n].astype(np.float16)
    with lib.writer(durable=False) as w:
        w.append(np.arange(100, 100 + n, dtype=np.uint64), cols, [encode_thumbnail(im, fs) for im in images])
    if originals is not None:
        originals.mkdir(exist_ok=True)
        for i, im in enumerate(images):
            im.save(originals / f"{100 + i}.png")
    return Library.open(path)


def column_bytes(lib: Library, names: tuple[str, ...] = SHARED) -> dict[str, bytes]:
    return {name: (lib.path / f"{name}.bin").read_bytes() for name in names}


def orange_first(lib: Library) -> list[int]:
    hits = Searcher(lib).search(Query(colors=(("#FF8800", 1.0),), top_k=4))
    return [h.seed for h in hits]


def test_old_library_answers_what_it_can_and_says_how_to_upgrade(tmp_path: Path) -> None:
    lib = v1_library(tmp_path / "old")
    s = Searcher(lib, embedder=FakeEmbedder())
    assert [h.seed % 6 for h in s.search(Query(text="orange", top_k=4))] == [100 % 6] * 4
    bright = s.search(Query(stats=(StatTarget("brightness", lo=0.8),), top_k=2))
    assert {(h.seed - 100) % 6 for h in bright} == {4}
    assert s.search(Query(regions=(RegionTarget("top", lightness=0.9),), top_k=1))[0].seed % 6 == (100 + 4) % 6
    for q in (Query(colors=(("#FF8800", 1.0),)), Query(regions=(RegionTarget("top", color="#FF8800"),)),
              Query(text="orange", colors=(("#FF8800", 1.0),))):
        with pytest.raises(QueryError, match=rf"colour features v1.*python -m noisequery_core upgrade --library {lib.path}"):
            s.search(q)
    rep = verify(lib.path)
    assert rep.ok and any("upgrade" in w for w in rep.warnings)


def test_upgrade_from_thumbnails(tmp_path: Path) -> None:
    lib = v1_library(tmp_path / "lib")
    before = column_bytes(lib)
    rep = upgrade_colour(lib)
    assert (rep.from_version, rep.to_version, rep.rows, rep.computed, rep.from_thumbnails) == (1, color.COLOR_VERSION, 24, 24, 24)
    lib = Library.open(lib.path)
    assert lib.features.color_version == color.COLOR_VERSION
    assert [c.name for c in lib.manifest.columns] == ["seeds", *[c[0] for c in color.COLUMNS_BY_VERSION[color.COLOR_VERSION]], "clip"]
    assert column_bytes(lib) == before, "columns the versions share must be left untouched"
    left = sorted(p.name for p in lib.path.iterdir() if p.is_file())
    assert "hist.bin" not in left and STATE_NAME not in left and not [p for p in left if p.endswith(".upgrade")]
    assert lib.manifest.notes["colour_upgrade"]["from"] == 1
    # The palette is the one the library computes from each thumbnail.
    for row, seed in enumerate(np.asarray(lib.seeds)):
        thumb = lib.thumbnail_path(int(seed))
        assert thumb is not None
        with Image.open(thumb) as im:
            want = color.analyse_palette(color.prepare(im.convert("RGB")))
        assert np.array_equal(lib.column("palette")[row], want["palette"])
        assert np.array_equal(lib.column("palette_shares")[row], want["palette_shares"])
    assert [(s - 100) % 6 for s in orange_first(lib)] == [0] * 4
    assert verify(lib.path).ok and not verify(lib.path).warnings
    again = upgrade_colour(lib.path)
    assert again.computed == 0 and "already" in again.summary()


def test_upgrade_from_original_images_matches_a_fresh_import(tmp_path: Path) -> None:
    lib = v1_library(tmp_path / "lib", originals=tmp_path / "imgs")
    (tmp_path / "imgs" / "105.png").unlink()  # this one falls back to its thumbnail
    rep = upgrade_colour(lib, tmp_path / "imgs")
    assert (rep.from_originals, rep.from_thumbnails) == (23, 1)
    lib = Library.open(lib.path)
    fresh = import_folder(tmp_path / "imgs", tmp_path / "fresh", embedder=None, thumbnail_size=0)
    assert fresh.added == 23
    new = Library.open(tmp_path / "fresh")
    rows = lib.rows_of(np.asarray(new.seeds))
    for name in ("palette", "palette_shares"):
        assert np.array_equal(np.asarray(lib.column(name))[rows], np.asarray(new.column(name)))


def test_upgrade_without_any_source_fails_before_switching(tmp_path: Path) -> None:
    lib = v1_library(tmp_path / "lib", thumbs=0)
    with pytest.raises(LibraryError, match=r"no original image.*has no thumbnails.*--images <folder>"):
        upgrade_colour(lib)
    assert Library.open(lib.path).features.color_version == 1
    lib = v1_library(tmp_path / "lib2", thumbs=64)
    (lib.thumbnail_path(103) or Path()).write_bytes(b"not an image")
    with pytest.raises(LibraryError, match=r"Cannot read the thumbnail .*103\.webp.*--images <folder>"):
        upgrade_colour(lib, batch_size=2)
    assert Library.open(lib.path).features.color_version == 1
    assert (lib.path / STATE_NAME).exists(), "the rows before the bad file stay committed"


def test_cancel_and_torn_write_then_resume_equals_an_uninterrupted_upgrade(tmp_path: Path) -> None:
    ref = v1_library(tmp_path / "ref")
    upgrade_colour(ref)
    lib = v1_library(tmp_path / "lib")
    calls = {"n": 0}

    def cancel_after_two() -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise Cancelled("the upgrade was stopped; run it again to continue")

    seen: list[tuple[int, int]] = []
    with pytest.raises(Cancelled, match="run it again to continue"):
        upgrade_colour(lib, batch_size=5, check_cancel=cancel_after_two, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 24), (5, 24), (10, 24)]
    old = Library.open(lib.path)
    assert old.features.color_version == 1 and old.count == 24
    with pytest.raises(QueryError, match="upgrade"):
        Searcher(old).search(Query(colors=(("#FF8800", 1.0),)))
    with open(lib.path / "palette.bin.upgrade", "ab") as f:  # a batch written but never committed
        f.write(b"\xff" * 1000)
    seen.clear()
    rep = upgrade_colour(lib.path, batch_size=5, progress=lambda d, t: seen.append((d, t)))
    assert rep.computed == 14 and seen[0] == (10, 24) and seen[-1] == (24, 24)
    done = Library.open(lib.path)
    for name in ("palette", "palette_shares"):
        assert np.array_equal(np.asarray(done.column(name)), np.asarray(Library.open(ref.path).column(name)))


def test_crash_before_and_after_the_manifest_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = v1_library(tmp_path / "lib")

    class Killed(BaseException):
        pass

    def die(*a: object, **k: object) -> None:
        raise Killed

    # Killed after the new columns got their final names, before the manifest switch: still v1, resumes.
    monkeypatch.setattr(upgrade_mod, "write_manifest", die)
    with pytest.raises(Killed):
        upgrade_colour(lib)
    monkeypatch.undo()
    old = Library.open(lib.path)
    assert old.features.color_version == 1 and (lib.path / "palette.bin").exists()
    assert verify(lib.path).ok
    # Killed after the switch, before the old version's files were deleted: v2, fully usable.
    monkeypatch.setattr(upgrade_mod, "_remove_leftovers", die)
    with pytest.raises(Killed):
        upgrade_colour(lib.path)
    monkeypatch.undo()
    new = Library.open(lib.path)
    assert new.features.color_version == color.COLOR_VERSION and (lib.path / "hist.bin").exists()
    assert [(s - 100) % 6 for s in orange_first(new)] == [0] * 4
    rep = upgrade_colour(lib.path)
    assert rep.computed == 0 and "hist.bin" in rep.removed and STATE_NAME in rep.removed
    assert not (lib.path / "hist.bin").exists()


def test_a_library_never_mixes_colour_versions(tmp_path: Path) -> None:
    lib = v1_library(tmp_path / "old", originals=tmp_path / "imgs")
    with pytest.raises(IncompatibleLibraryError, match=r"Colour features differ: upgrade .*upgrade --library"):
        import_folder(tmp_path / "imgs", lib.path, embedder=FakeEmbedder(), generation=GenerationKey(model="m"))  # type: ignore[arg-type]
    assert Library.open(lib.path).count == 24
    import_folder(tmp_path / "imgs", tmp_path / "new", embedder=None, thumbnail_size=0)
    Library.create(tmp_path / "old_colour_only", GenerationKey(), FeatureSet(clip=None, color_version=1, thumbnail_size=0))
    with pytest.raises(IncompatibleLibraryError, match=r"Colour features differ: upgrade the older library"):
        merge([tmp_path / "old_colour_only", tmp_path / "new"], tmp_path / "merged")


def test_cli_upgrade_and_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lib = v1_library(tmp_path / "lib")
    assert main(["search", "--library", str(lib.path), "--color", "#FF8800", "--top-k", "2"]) == 2
    assert f"upgrade --library {lib.path}" in capsys.readouterr().err
    out: list[str] = []
    assert main(["upgrade", "--library", str(lib.path), "-q"], out=out.append) == 0
    assert "v1 → v2 for 24 entries (0 from original images, 24 from thumbnails)" in out[0]
    assert main(["search", "--library", str(lib.path), "--color", "#FF8800", "--top-k", "2", "--json"], out=out.append) == 0


KILL_SCRIPT = """
import sys
from noisequery_core.library.upgrade import upgrade_colour
upgrade_colour(sys.argv[1], batch_size=4, workers=1, progress=lambda d, t: print(d, flush=True))
"""


@pytest.mark.slow
def test_sigkill_during_upgrade_then_resume(tmp_path: Path) -> None:
    ref = v1_library(tmp_path / "ref", n=120)
    upgrade_colour(ref)
    lib = v1_library(tmp_path / "lib", n=120)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for delay in (0.2, 0.9, 0.5, 1.4):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(lib.path)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for a first commit, then kill at an arbitrary moment
            line = proc.stdout.readline()
            if not line or int(line.split()[0]) >= 4:
                break
        time.sleep(delay * 0.1)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        opened = Library.open(lib.path)  # opens, with the old or the new version
        assert opened.features.color_version in (1, color.COLOR_VERSION)
        assert verify(lib.path).ok
        if opened.features.color_version == 1:
            with pytest.raises(QueryError, match="upgrade"):
                Searcher(opened).search(Query(colors=(("#FF8800", 1.0),)))
    assert kills >= 1, "the upgrade finished before it could be killed; make the library larger"
    upgrade_colour(lib.path)
    done, want = Library.open(lib.path), Library.open(ref.path)
    assert done.features.color_version == color.COLOR_VERSION
    for name in ("palette", "palette_shares", *SHARED):
        assert np.array_equal(np.asarray(done.column(name)), np.asarray(want.column(name)))
    assert not (lib.path / "hist.bin").exists() and not (lib.path / STATE_NAME).exists()
