"""verify and merge: libraries built over disjoint seed ranges, refusing mismatched ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import solid

from noisequery_core import IncompatibleLibraryError, Library, import_folder, merge, verify
from noisequery_core.library.manifest import GenerationKey


def build(tmp: Path, name: str, seeds: range, gen: GenerationKey | None = None) -> Path:
    src = tmp / f"{name}_imgs"
    src.mkdir()
    for s in seeds:
        solid(((s * 37) % 256, (s * 91) % 256, (s * 13) % 256), 32).save(src / f"{s}.png")
    import_folder(src, tmp / name, embedder=None, generation=gen, thumbnail_size=16, batch_size=8)
    return tmp / name


def test_merge_disjoint_ranges(tmp_path: Path) -> None:
    a = build(tmp_path, "a", range(0, 20))
    b = build(tmp_path, "b", range(20, 45))
    c = build(tmp_path, "c", range(40, 50))  # overlaps b on 40..44
    rep = merge([a, b, c], tmp_path / "all")
    assert rep.added == 50 and rep.overlapping == 5
    lib = Library.open(tmp_path / "all")
    assert sorted(int(s) for s in lib.seeds) == list(range(50))
    assert lib.thumbnail_path(33) is not None
    row_all = int(lib.rows_of([33])[0])
    row_b = int(Library.open(b).rows_of([33])[0])
    assert np.array_equal(lib.column("stats")[row_all], Library.open(b).column("stats")[row_b])
    assert verify(lib.path).ok
    again = merge([a], tmp_path / "all")
    assert again.added == 0 and again.overlapping == 20


def test_merge_refuses_other_generation_key(tmp_path: Path) -> None:
    a = build(tmp_path, "a", range(0, 3), GenerationKey(model="sd15.safetensors", steps=20))
    b = build(tmp_path, "b", range(3, 6), GenerationKey(model="sd15.safetensors", steps=30))
    with pytest.raises(IncompatibleLibraryError, match="steps: 20 ≠ 30"):
        merge([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="also a source"):
        merge([a], a)


def test_verify_finds_damage(tmp_path: Path) -> None:
    a = build(tmp_path, "a", range(0, 6))
    assert verify(a).ok
    (a / "thumbs" / "3.webp").unlink()
    rep = verify(a)
    assert rep.ok and any("no thumbnail" in w for w in rep.warnings)
    # duplicate seed rows can only come from outside tampering; verify must catch them
    seeds = np.fromfile(a / "seeds.bin", dtype="<u8")
    seeds[1] = seeds[0]
    seeds.tofile(a / "seeds.bin")
    rep = verify(a)
    assert not rep.ok and "duplicate seed" in rep.problems[0]
    (a / "stats.bin").write_bytes(b"")
    assert not verify(a).ok
