"""Library names from workflows can never reach outside the registered folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_lib import make_library

from noisequery_core.errors import LibraryError
from noisequery_core.library.paths import check_library_name, list_libraries, resolve_library


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc", "C:/Windows", "~/lib", "..", ".hidden", "a/.git", "", "   ", "a\\..\\..\\b", "x\x00y", "a/b:c"],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(LibraryError):
        check_library_name(name)


def test_good_names() -> None:
    assert check_library_name("sd15_empty_512") == ["sd15_empty_512"]
    assert check_library_name("team/sdxl-1024 v2") == ["team", "sdxl-1024 v2"]


def test_resolve_list_and_symlinks(tmp_path: Path) -> None:
    root_a, root_b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    for d in (root_a, root_b, outside):
        d.mkdir()
    make_library(root_b / "libb", [1], dim=None)
    make_library(root_a / "sub" / "liba", [1], dim=None)
    make_library(outside / "secret", [1], dim=None)
    os.symlink(outside / "secret", root_a / "escape")
    os.symlink(outside, root_a / "escape_dir")
    assert list_libraries([root_a, root_b]) == ["libb", "sub/liba"]
    assert resolve_library([root_a, root_b], "libb", must_exist=True) == (root_b / "libb").resolve()
    assert resolve_library([root_a, root_b], "new", must_exist=False) == (root_a / "new").resolve()
    with pytest.raises(LibraryError, match="outside the noise_libraries folder"):
        resolve_library([root_a, root_b], "escape", must_exist=True)
    with pytest.raises(LibraryError, match="outside the noise_libraries folder"):
        resolve_library([root_a, root_b], "escape_dir/secret", must_exist=True)
    with pytest.raises(LibraryError, match="No noise library named 'nope'"):
        resolve_library([root_a, root_b], "nope", must_exist=True)
