"""noisequery_core must never import ComfyUI: import every module with comfy* blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_core_imports_without_comfyui() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        BLOCKED = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"noisequery_core imported ComfyUI module {name!r}")
                return None

        sys.meta_path.insert(0, Block())
        import noisequery_core
        for m in pkgutil.walk_packages(noisequery_core.__path__, "noisequery_core."):
            if m.name.endswith("__main__"):
                continue
            importlib.import_module(m.name)
        leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not leaked, leaked
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
