"""Type-check the core and the ComfyUI glue in one mypy run: ``python scripts/typecheck.py [extra mypy args]``.

The repository root is the pack's package (nodes/ imports ``..noisequery_core``, because ComfyUI loads the
pack from its folder), and that folder is named however it was cloned -- often not a Python name -- so
mypy cannot name the glue's modules from its files: checked as a top-level ``nodes``, every relative
import of the core would silently become ``Any``. This script links the root as ``noisequery_pack`` in
a scratch folder and checks ``noisequery_pack.noisequery_core`` and ``noisequery_pack.nodes`` with the
``[tool.mypy]`` settings of pyproject.toml; paths in mypy's report are given back relative to the root.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "noisequery_pack"


def package_link() -> Path:
    """``<tmp>/noisequery-mypy-<hash of ROOT>/noisequery_pack`` -> ROOT (stable, so mypy's cache is reused).

    Kept outside the repository: a link to the root inside it would make the tree contain itself.
    """
    scratch = Path(tempfile.gettempdir()) / f"noisequery-mypy-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
    scratch.mkdir(exist_ok=True)
    link = scratch / PACKAGE
    if not (link.is_symlink() and link.resolve() == ROOT):
        if link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(ROOT, target_is_directory=True)
        except FileExistsError:  # another run made it at the same moment
            pass
    return link


def main(argv: list[str]) -> int:
    from mypy import api

    link = package_link()
    os.environ["MYPYPATH"] = str(link.parent)
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "-p", f"{PACKAGE}.noisequery_core", "-p", f"{PACKAGE}.nodes", *argv,
    ])
    prefix = f"{link}{os.sep}"
    sys.stdout.write(stdout.replace(prefix, ""))
    sys.stderr.write(stderr.replace(prefix, ""))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
