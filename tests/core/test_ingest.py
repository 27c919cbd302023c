"""Import of seed-named image folders: bad names, corrupt files, duplicates, idempotence, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import solid

from noisequery_core import Library, import_folder, parse_seed_name, verify
from noisequery_core.errors import Cancelled
from noisequery_core.work import cancel_when

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "seed"),
    [("1.jpg", 1), ("45920.png", 45920), ("0007.webp", 7), ("18446744073709551615.png", 2**64 - 1),
     ("18446744073709551616.png", None), ("-1.png", None), ("a1.png", None), ("1.txt", None), ("١٢.png", None), ("1.5.png", None)],
)
def test_parse_seed_name(name: str, seed: int | None) -> None:
    assert parse_seed_name(name) == seed


def test_import_reports_and_skips_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    for s, c in [(1, (255, 0, 0)), (2, (0, 255, 0)), (45920, (0, 0, 255))]:
        solid(c).save(src / f"{s}.png")
    solid((9, 9, 9)).save(src / "cover.png")  # not a seed name
    (src / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")  # corrupt
    (src / "4.png").write_bytes(b"")  # empty
    solid((1, 2, 3)).save(src / "0001.jpg")  # duplicate of seed 1
    (src / "notes.txt").write_text("x")
    rep = import_folder(src, tmp_path / "lib", embedder=None, batch_size=2, thumbnail_size=32)
    assert rep.added == 3
    assert rep.files == 8
    reasons = dict(rep.skipped)
    # "0001.jpg" sorts before "1.png", so 1.png is the duplicate of seed 1
    assert set(reasons) == {"cover.png", "3.jpg", "4.png", "1.png", "notes.txt"}
    assert "unreadable" in reasons["3.jpg"] and "unreadable" in reasons["4.png"]
    assert "not <seed>" in reasons["cover.png"]
    assert any("duplicate" in r for r in reasons.values())
    assert "5 skipped" in rep.summary() and "cover.png" in rep.summary()
    lib = Library.open(tmp_path / "lib")
    assert sorted(int(s) for s in lib.seeds) == [1, 2, 45920]
    assert lib.thumbnail_path(45920) is not None and lib.thumbnail_path(3) is None
    row = int(lib.rows_of([2])[0])
    assert lib.column("stats")[row][6] == pytest.approx(1.0, abs=1e-3)  # mean_g of pure green

    again = import_folder(src, tmp_path / "lib", embedder=None, batch_size=2, thumbnail_size=32)
    assert again.added == 0 and again.already_present == 3
    assert Library.open(tmp_path / "lib").count == 3


def test_import_with_clip_and_cancel_keeps_committed(tmp_path: Path, tiny_clip) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "imgs"
    src.mkdir()
    for s in range(10):
        solid((s * 20, 100, 200 - s * 20)).save(src / f"{s}.png")
    calls = {"n": 0}

    def cancel_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled, match="run it again to continue"):
        import_folder(src, tmp_path / "lib", embedder=tiny_clip, batch_size=3,
                      check_cancel=cancel_when(cancel_after_two, "the import"))
    assert Library.open(tmp_path / "lib").count == 6
    rep = import_folder(src, tmp_path / "lib", embedder=tiny_clip, batch_size=3)
    assert rep.added == 4 and rep.already_present == 6
    lib = Library.open(tmp_path / "lib")
    emb = np.asarray(lib.column("clip"), np.float32)
    assert emb.dtype == np.float32 and lib.column("clip").dtype == np.float16
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=5e-3)
    assert verify(lib.path).ok


KILL_SCRIPT = """
import sys
from noisequery_core import import_folder
import_folder(sys.argv[1], sys.argv[2], embedder=None, batch_size=4, workers=1, thumbnail_size=16,
              progress=lambda d, t, m='': print(d, flush=True))
"""


@pytest.mark.slow
def test_sigkill_during_import_then_resume(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    n = 240
    rng = np.random.default_rng(0)
    for s in range(n):
        solid(tuple(int(x) for x in rng.integers(0, 256, 3)), 96).save(src / f"{1000 + s}.png")
    lib_dir = tmp_path / "lib"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for delay in (0.8, 1.3, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(lib_dir)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        # wait until at least one batch is committed, then kill at an arbitrary moment
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line or int(line.split()[0]) >= 8:
                break
        time.sleep(delay * 0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        rep = verify(lib_dir)
        assert rep.ok, rep.problems
        lib = Library.open(lib_dir)
        seeds = np.asarray(lib.seeds)
        assert len(np.unique(seeds)) == len(seeds)
    assert kills >= 1, "import finished before it could be killed; make the folder larger"
    final = import_folder(src, lib_dir, embedder=None, batch_size=16, thumbnail_size=16)
    lib = Library.open(lib_dir)
    assert lib.count == n
    assert sorted(int(s) for s in lib.seeds) == list(range(1000, 1000 + n))
    assert final.added == n - final.already_present
    rep = verify(lib_dir)
    assert rep.ok and not [w for w in rep.warnings if "no thumbnail" in w]
