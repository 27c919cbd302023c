"""The Noise Libraries sidebar tab (web/js/noisequery_library_panel.js) in the real ComfyUI page (headless Chromium).

Runs scripts/library_panel_check.py --no-pictures, which starts its own headless ComfyUI with the tiny checkpoint,
builds a 12-entry library (CLIP ViT-B-32 with random weights) and drives the page in the classic renderer and in
Nodes 2.0: open the tab, pick the library, type a text, see the thumbnails; select the KSampler and click a hit →
its seed (control_after_generate fixed); drag a hit onto the KSampler → its seed; add a colour and press "use
query" on hit #3 → Noise Query (Text) + (Colour) nodes with rank_offset 3 feeding the KSampler's seed; Run → the
image equals the library's thumbnail of that seed (encoded the same way) and no other entry's. Runs once per
frontend (`frontend` fixture: the pinned comfyui-frontend-package, and the newest one through --front-end-root).
Skipped without a ComfyUI checkout, Debian's /usr/bin/chromium or the playwright package (in CI a skip is a
failure: tests/conftest.py).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import comfy_harness
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="pip package playwright missing"),
]

CHECKS = [
    "typed a text: 12 thumbnails shown",
    "click on hit #1 → KSampler seed",
    "dragged hit #2 onto the KSampler → seed",
    "'use this query' on hit #3 → NoiseQueryText(rank_offset 3) + NoiseQueryColor feeding the KSampler seed",
    "Run → image equals the library entry of seed",
]


def test_library_panel_in_the_page(tmp_path: Path, frontend: comfy_harness.Frontend, tiny_checkpoint: Path,
                                   nq_clip_dir: Path, clip_weights: Path) -> None:
    # the script's work folder gets the session's tiny checkpoint and random CLIP weights (no rewrite per run)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / comfy_harness.TINY_CKPT_NAME).symlink_to(tiny_checkpoint)
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "library_panel_check.py"), "--no-pictures",
           "--workdir", str(tmp_path), "--clip-dir", str(nq_clip_dir)]
    if frontend.root is not None:
        cmd += ["--front-end-root", str(frontend.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(f"frontend {frontend.name} ({frontend.version}):\n{out[-2500:]}")
    assert proc.returncode == 0, out[-4000:]
    assert f"the page runs comfyui-frontend-package {frontend.version}" in out, out[-4000:]
    for renderer in ("classic", "nodes2"):
        for check in CHECKS:
            assert f"{renderer}: {check}" in out, f"{renderer}: missing {check!r}\n{out[-4000:]}"
    assert (tmp_path / "library_panel.png").is_file()
