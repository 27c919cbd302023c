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


def test_node_modules_share_glue_only_through_shared_modules() -> None:
    """A node module never imports another node family's module: shared things live in nodes/_glue.py,
    nodes/_host.py or nodes/sampling.py; a family's *_runtime module belongs to its own *_nodes module."""
    import ast

    nodes_dir = ROOT / "nodes"
    families = {p.stem for p in nodes_dir.glob("*.py") if p.stem.endswith(("_nodes", "_runtime"))}
    assert families, "no node modules found"
    wrong = []
    for path in sorted(nodes_dir.glob("*.py")):
        if path.stem == "__init__":
            continue
        own = path.stem.rsplit("_", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    target = name.split(".")[0]
                    if target in families and target != path.stem and target != f"{own}_runtime":
                        wrong.append(f"{path.name} imports {target}")
    assert not wrong, wrong
