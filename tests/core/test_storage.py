"""The on-disk library: commits, seeds over the full uint64 range, crash leftovers, bad manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_lib import feature_set, make_library, rows

from noisequery_core.errors import IncompatibleLibraryError, LibraryError, LibraryLockedError, SchemaVersionError
from noisequery_core.library.manifest import GenerationKey
from noisequery_core.library.storage import SEED_MAX, Library


def test_full_seed_range_round_trips(tmp_path: Path) -> None:
    seeds = [0, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, SEED_MAX]
    lib = make_library(tmp_path / "lib", seeds)
    again = Library.open(tmp_path / "lib")
    assert [int(s) for s in again.seeds] == seeds
    assert again.rows_of([SEED_MAX, 2**63, 5]).tolist() == [6, 5, -1]
    assert lib.contains([2**53 + 1]).tolist() == [True]


def test_append_skips_existing_and_batch_duplicates(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1, 2, 3])
    with lib.writer(durable=False) as w:
        added = w.append(np.array([3, 4, 4, 5], np.uint64), rows(4))
    assert added == 2
    assert sorted(int(s) for s in Library.open(lib.path).seeds) == [1, 2, 3, 4, 5]


def test_reader_sees_only_committed_rows(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1, 2])
    reader = Library.open(lib.path)
    with lib.writer(durable=False) as w:
        w.append([10, 11, 12], rows(3))
        assert reader.count == 2 and len(reader.seeds) == 2
        assert reader.refresh() is True
        assert reader.count == 5


def test_uncommitted_tail_is_discarded(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1, 2])
    with open(lib.path / "seeds.bin", "ab") as f:  # what a writer killed before its commit leaves
        f.write(np.array([99], np.uint64).tobytes())
    with open(lib.path / "clip.bin", "ab") as f:
        f.write(b"\x00" * 7)
    assert Library.open(lib.path).count == 2
    with Library.open(lib.path).writer(durable=False) as w:
        w.append([3], rows(1))
    again = Library.open(lib.path)
    assert [int(s) for s in again.seeds] == [1, 2, 3]
    assert (lib.path / "clip.bin").stat().st_size == 3 * 16 * 2


def test_second_writer_is_refused(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1])
    with lib.writer():
        with pytest.raises(LibraryLockedError, match="being written by another process"):
            Library.open(lib.path).writer().__enter__()


def test_manifest_from_the_future(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1])
    m = json.loads((lib.path / "manifest.json").read_text())
    m["schema_version"] = 99
    (lib.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError, match="newer NoiseQuery.*Update the NoiseQuery pack"):
        Library.open(lib.path)


@pytest.mark.parametrize("damage", ["not json", "[]", '{"format": "other"}'])
def test_damaged_manifest(tmp_path: Path, damage: str) -> None:
    lib = make_library(tmp_path / "lib", [1])
    (lib.path / "manifest.json").write_text(damage)
    with pytest.raises(LibraryError):
        Library.open(lib.path)


def test_truncated_column_is_reported(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1, 2, 3])
    with open(lib.path / "stats.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LibraryError, match="stats.bin holds 0 rows but the manifest commits 3"):
        Library.open(lib.path)


def test_missing_library_and_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match="does not exist"):
        Library.open(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("hi")
    with pytest.raises(LibraryError, match="not empty"):
        Library.create(tmp_path / "foreign", GenerationKey(), feature_set())


def test_create_refuses_other_generation_key(tmp_path: Path) -> None:
    make_library(tmp_path / "lib", [1], gen=GenerationKey(model="a"))
    with pytest.raises(IncompatibleLibraryError, match="model: 'b' ≠ 'a'|model: 'a' ≠ 'b'"):
        Library.create(tmp_path / "lib", GenerationKey(model="b"), feature_set())


def test_wrong_column_shape_is_refused(tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", [1])
    bad = rows(2)
    bad["stats"] = bad["stats"][:, :3]
    with lib.writer(durable=False) as w, pytest.raises(LibraryError, match="'stats' has shape"):
        w.append([5, 6], bad)
    assert Library.open(lib.path).count == 1
