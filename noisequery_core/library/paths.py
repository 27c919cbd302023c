"""Names from workflows → folders: a library name can never reach outside its registered roots.

The naming rule (also what ``list_libraries`` can list): a name is one folder, or one group
folder and one folder (``team/sdxl_1024``); each part at most MAX_PART characters of letters,
digits, ``_ - . space``, no leading dot; ``thumbs`` and ``index`` are reserved (a library keeps
its own folders under those names); and a new library never goes inside another library.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import LibraryError

MAX_PART = 64
MAX_PARTS = 2  # = list_libraries' max_depth: every library that can be created can be listed
RESERVED = ("thumbs", "index")  # folder names inside a library (library/storage.py)
# One path component of letters, digits and . _ - space, no leading dot.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]*$")


def check_library_name(name: str) -> list[str]:
    """Split a library name into safe components, or raise LibraryError saying why it is refused."""
    if not isinstance(name, str) or not name.strip():
        raise LibraryError("The library name is empty: type a name such as 'sd15_empty_512'.")
    if "\x00" in name:
        raise LibraryError(f"Library name {name!r} contains a NUL character; type a plain name such as 'sd15_empty_512'.")
    if len(name) > MAX_PARTS * (MAX_PART + 1):
        raise LibraryError(
            f"Library name {name[:40]!r}… is {len(name)} characters long; a name may have at most {MAX_PARTS} parts of "
            f"{MAX_PART} characters each."
        )
    raw = name.strip().replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:(/|$)", raw) or raw.startswith("~"):
        raise LibraryError(
            f"Library name {name!r} is an absolute path; give a name inside the noise_libraries folder instead "
            "(use extra_model_paths.yaml to move that folder)."
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    for p in parts:
        if p == ".." or not _COMPONENT.match(p) or p.endswith((".", " ")):
            raise LibraryError(
                f"Library name {name!r} has the part {p!r}, which is not allowed: use letters, digits, '_', '-', '.' "
                "and '/' for sub-folders, no '..' and no leading dot."
            )
        if len(p) > MAX_PART:
            raise LibraryError(f"Library name {name!r}: the part {p[:20]!r}… has {len(p)} characters; at most {MAX_PART} are allowed.")
        if p.lower() in RESERVED:
            raise LibraryError(
                f"Library name {name!r} uses the reserved folder name {p!r} (a library keeps its {' and '.join(RESERVED)} "
                "folders under those names); pick another name."
            )
    if not parts:
        raise LibraryError(f"Library name {name!r} names no folder.")
    if len(parts) > MAX_PARTS:
        raise LibraryError(
            f"Library name {name!r} has {len(parts)} levels; at most {MAX_PARTS} are allowed (a group folder and a name, "
            "like 'team/sdxl_1024'), so that every library shows up in the library lists."
        )
    return parts


def resolve_library(roots: Sequence[str | os.PathLike[str]], name: str, *, must_exist: bool) -> Path:
    """The folder for ``name`` inside one of ``roots``.

    Existing libraries are looked up in every root in order; a new one goes into the first
    root. After resolving symlinks the result must still lie inside its root, otherwise
    LibraryError. Raises LibraryError when ``must_exist`` and no root holds the library.
    """
    parts = check_library_name(name)
    if not roots:
        raise LibraryError("No noise_libraries folder is registered; check extra_model_paths.yaml.")
    for root in roots:
        root_real = Path(root).resolve()
        cand = Path(root).joinpath(*parts)
        if (cand / "manifest.json").exists() or (not must_exist and cand.exists()):
            return _inside(root_real, cand, name)
    if must_exist:
        where = ", ".join(str(r) for r in roots)
        raise LibraryError(
            f"No noise library named {name!r} in {where}. Build it with BuildNoiseLibrary, import images with "
            "`python -m noisequery_core import`, or refresh the page to update the list."
        )
    root0 = Path(roots[0])
    for depth in range(1, len(parts)):
        outer = root0.joinpath(*parts[:depth])
        if (outer / "manifest.json").exists():
            raise LibraryError(
                f"Library name {name!r} would put a library inside the library {'/'.join(parts[:depth])!r}, where it could "
                "not be listed or found; pick a name outside it (e.g. without the '/')."
            )
    return _inside(root0.resolve(), root0.joinpath(*parts), name)


def _inside(root_real: Path, cand: Path, name: str) -> Path:
    real = cand.resolve()
    if real != root_real and root_real not in real.parents:
        raise LibraryError(
            f"Library name {name!r} resolves to {real}, outside the noise_libraries folder {root_real} "
            "(a symbolic link points out of it); refusing to use it."
        )
    return real


def list_libraries(roots: Sequence[str | os.PathLike[str]], max_depth: int = MAX_PARTS) -> list[str]:
    """Names (relative, '/'-separated) of every folder holding a manifest.json under the roots."""
    found: list[str] = []
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        base_real = base.resolve()
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            rel = Path(dirpath).relative_to(base)
            depth = len(rel.parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in RESERVED)
            if depth >= max_depth:
                dirnames[:] = []
            if "manifest.json" in filenames and depth > 0:
                real = Path(dirpath).resolve()
                if real == base_real or base_real in real.parents:
                    name = "/".join(rel.parts)
                    if name not in found:
                        found.append(name)
                dirnames[:] = []
    return sorted(found)
