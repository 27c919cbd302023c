"""export: every entry as a table (csv / jsonl / parquet) and the CLIP embeddings as .npy, streamed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_lib import make_library

from noisequery_core.cli import main
from noisequery_core.errors import NoiseQueryError
from noisequery_core.library import export as ex
from noisequery_core.library.storage import Library
from noisequery_core.search import color, palette

SEEDS = [2**64 - 1, 0, 7, 12345, 2**63 + 5]


def _library(tmp_path: Path) -> Library:
    lib = make_library(tmp_path / "lib", SEEDS)
    # Give row 2 a two-colour palette: orange 70 %, blue 30 % of the whole image (shares in 1/255).
    codes = palette.codes_of(np.array([[255, 136, 0], [30, 80, 200]], np.uint8))
    pal = np.asarray(lib.column("palette")).copy()
    shares = np.asarray(lib.column("palette_shares")).copy()
    pal[2, :2, 0] = codes[::-1]  # blue first, with the smaller share: export sorts by share
    shares[2, 0, :] = 0
    shares[2, 0, :2] = [77, 178]
    for name, arr in (("palette", pal), ("palette_shares", shares)):
        path = lib.path / f"{name}.bin"
        path.write_bytes(arr.tobytes())
    return Library.open(lib.path)


def test_code_hex_is_the_cell_centre() -> None:
    c = palette.codes_of(np.array([[255, 136, 0], [0, 0, 0], [255, 255, 255]], np.uint8))
    assert list(ex.code_hex(c)) == ["#FB8B04", "#040404", "#FBFBFB"]


def test_csv_round_trip(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    out = tmp_path / "rows.csv"
    assert ex.export_library(lib, out, "csv") == len(SEEDS)
    rows = list(csv.DictReader(out.open()))
    assert [int(r["seed"]) for r in rows] == SEEDS  # full uint64, library order
    stats = np.asarray(lib.column("stats"), np.float64)
    for i, r in enumerate(rows):
        for j, name in enumerate(color.STAT_NAMES):
            assert float(r[name]) == pytest.approx(stats[i, j], abs=1e-6)
    assert rows[2]["color1_hex"] == "#FB8B04" and float(rows[2]["color1_share"]) == pytest.approx(178 / 255, abs=1e-4)
    assert rows[2]["color2_hex"] == "#1C54CB" and float(rows[2]["color2_share"]) == pytest.approx(77 / 255, abs=1e-4)
    assert rows[2]["color3_hex"] == "" and rows[2]["color3_share"] == ""
    assert not (tmp_path / "rows.csv.part").exists()


def test_jsonl_and_clip_npy(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    out, npy = tmp_path / "rows.jsonl", tmp_path / "clip.npy"
    ex.export_library(lib, out, "jsonl", clip_npy=npy)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seed"] for r in rows] == SEEDS
    assert rows[0]["color2_share"] is None  # no NaN in JSON
    emb = np.load(npy)
    assert emb.dtype == np.float16 and np.array_equal(emb, np.asarray(lib.column("clip")))


def test_parquet(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (requirements-dev.txt) is needed for parquet")
    lib = _library(tmp_path)
    out = tmp_path / "rows.parquet"
    ex.export_library(lib, out, "parquet")
    table = pq.read_table(out).to_pydict()
    assert [int(s) for s in table["seed"]] == SEEDS
    assert table["color1_hex"][2] == "#FB8B04"


def test_export_streams_in_chunks_and_honours_cancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from noisequery_core.errors import Cancelled

    lib = make_library(tmp_path / "lib", list(range(10)))
    monkeypatch.setattr(ex, "CHUNK_ROWS", 3)
    seen: list[tuple[int, int]] = []
    ex.export_library(lib, tmp_path / "a.csv", "csv", progress=lambda d, t, m="": seen.append((d, t)))
    assert seen == [(3, 10), (6, 10), (9, 10), (10, 10)]
    calls = {"n": 0}

    def stop_second() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        ex.export_library(lib, tmp_path / "b.csv", "csv", check_cancel=stop_second)
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "b.csv.part").exists()


def test_cli_export_to_stdout_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lib = _library(tmp_path)
    assert main(["export", "--library", str(lib.path), "-q"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(SEEDS)
    assert main(["export", "--library", str(lib.path), "--format", "parquet", "-q"]) == 2
    assert "--out" in capsys.readouterr().err
    colour_only = make_library(tmp_path / "nc", [1, 2], dim=None)
    assert main(["export", "--library", str(colour_only.path), "--out", str(tmp_path / "x.csv"),
                 "--clip-npy", str(tmp_path / "x.npy")]) == 2
    assert "without CLIP" in capsys.readouterr().err


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(NoiseQueryError, match="Unknown export format"):
        ex.export_library(make_library(tmp_path / "lib", [1]), tmp_path / "x", "xlsx")
