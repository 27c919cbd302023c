"""The command line: every subcommand, --json output, exit status 2 with one line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import halves, solid

from noisequery_core.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "imgs"
    src.mkdir()
    solid((255, 136, 0)).save(src / "7.png")
    solid((10, 10, 10)).save(src / "8.png")
    halves((250, 250, 250), (0, 0, 200)).save(src / "9.png")
    (src / "bad.png").write_text("nope")
    return src


def run(args: list[str]) -> tuple[int, str]:
    out: list[str] = []
    code = main(args, out=out.append)
    return code, "\n".join(out)


def test_import_info_search_verify_merge(folder: Path, tmp_path: Path) -> None:
    lib = str(tmp_path / "lib")
    code, out = run(["import", str(folder), "--library", lib, "--clip-model", "none", "--json", "-q"])
    assert code == 0 and json.loads(out)["added"] == 3 and json.loads(out)["skipped"] == 1
    code, out = run(["info", "--library", lib, "--json"])
    assert code == 0 and json.loads(out)["count"] == 3
    code, out = run(["search", "--library", lib, "--color", "#FF8800", "--top-k", "1", "--json"])
    assert code == 0 and json.loads(out)[0]["seed"] == 7
    code, out = run(["search", "--library", lib, "--brightness", "0:0.1@2", "--json"])
    assert json.loads(out)[0]["seed"] == 8
    code, out = run(["search", "--library", lib, "--region", "top=0.95", "--region", "bottom=#0000C8", "--top-k", "1"])
    assert code == 0 and "seed 9" in out
    code, out = run(["verify", "--library", lib])
    assert code == 0 and "OK" in out
    code, out = run(["merge", lib, "--into", str(tmp_path / "m"), "--json", "-q"])
    assert code == 0 and json.loads(out)["added"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "--library", "{lib}", "--color", "orange"], "is not a hex colour"),
        (["search", "--library", "{lib}", "--color", "#fff", "--top-k", "0"], "top_k must be at least 1"),
        (["search", "--library", "{tmp}/missing", "--color", "#fff"], "does not exist"),
        (["search", "--library", "{lib}", "--text", "a cat"], "has no CLIP features"),
        (["search", "--library", "{lib}", "--brightness", "bright"], "not a number or a range"),
        # NaN passes every range test and would score every row NaN (hits in file order)
        (["search", "--library", "{lib}", "--brightness", "0.5@nan"], "brightness weight is NaN"),
        (["search", "--library", "{lib}", "--brightness", "nan"], "brightness target is NaN"),
        (["search", "--library", "{lib}", "--contrast", "0.1:inf"], "contrast hi is +infinity"),
        (["search", "--library", "{lib}", "--color", "#FF8800@-inf"], "colour #FF8800 weight is -infinity"),
        (["search", "--library", "{lib}", "--region", "top=nan"], "region top lightness is NaN"),
        (["search", "--library", "{lib}", "--region", "middle=#fff"], "Unknown region"),
        (["import", "{tmp}/nope", "--library", "{lib}", "--clip-model", "none"], "does not exist"),
        (["import", "{folder}", "--library", "{tmp}/x", "--clip-model", "ViT-B-32", "--clip-pretrained", "openai", "--offline", "--clip-cache", "{tmp}/cache"], "save them as"),
        (["index", "--library", "{lib}"], "no CLIP features"),
    ],
)
def test_bad_input_exits_2_with_one_line(folder: Path, tmp_path: Path, args: list[str], message: str) -> None:
    lib = tmp_path / "lib"
    assert run(["import", str(folder), "--library", str(lib), "--clip-model", "none", "-q"])[0] == 0
    argv = [a.format(lib=lib, tmp=tmp_path, folder=folder) for a in args]
    r = subprocess.run([sys.executable, "-m", "noisequery_core", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_future_schema_via_cli(folder: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    run(["import", str(folder), "--library", str(lib), "--clip-model", "none", "-q"])
    m = json.loads((lib / "manifest.json").read_text())
    m["schema_version"] = 7
    (lib / "manifest.json").write_text(json.dumps(m))
    code, _ = run(["info", "--library", str(lib)])
    assert code == 2


def test_progress_bar_on_stderr_only_and_quiet_silences_it(folder: Path, tmp_path: Path) -> None:
    def import_(lib: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "noisequery_core", "import", str(folder), "--library", lib,
                               "--clip-model", "none", "--json", *extra], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    r = import_(str(tmp_path / "a"))
    assert r.returncode == 0 and json.loads(r.stdout)["added"] == 3  # stdout is only the JSON
    assert "import" in r.stderr and "3/3" in r.stderr, r.stderr
    q = import_(str(tmp_path / "b"), "--quiet")
    assert q.returncode == 0 and json.loads(q.stdout)["added"] == 3
    assert "3/3" not in q.stderr and "\r" not in q.stderr, q.stderr  # only the warning about bad.png is left
