"""The variation explorer's click-to-pick loop in the real ComfyUI page (headless Chromium).

Runs scripts/explore_ui_check.py --no-pictures, which starts its own headless ComfyUI with the tiny checkpoint and
drives the page: Run, click variant #2 in the Variant Picker (the explorer's history widget must become exactly
the history the server offered), Run again (the server replays it: the walk is one pick longer), type a pick and
Run (the widget takes the returned history and `pick` goes back to -1). Runs once per frontend (`frontend` fixture:
the pinned comfyui-frontend-package, and the newest one through --front-end-root). Skipped without a ComfyUI
checkout, Debian's /usr/bin/chromium or the playwright package (in CI a skip is a failure: tests/conftest.py).
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


def test_click_to_pick_loop_in_the_page(tmp_path: Path, frontend: comfy_harness.Frontend, tiny_checkpoint: Path) -> None:
    # the script's work folder gets the session's tiny checkpoint instead of writing its own (~7 s a run)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / comfy_harness.TINY_CKPT_NAME).symlink_to(tiny_checkpoint)
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "explore_ui_check.py"), "--no-pictures", "--workdir", str(tmp_path)]
    if frontend.root is not None:
        cmd += ["--front-end-root", str(frontend.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(f"frontend {frontend.name} ({frontend.version}):\n{out[-2000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert f"the page runs comfyui-frontend-package {frontend.version}" in out, out[-4000:]
    assert "click on variant #2 wrote the offered history" in out, out[-4000:]
    assert "tab switch and back: the picker still shows" in out, out[-4000:]
    assert (tmp_path / "explore_picker.png").is_file()
    print(f"screenshot: {tmp_path / 'explore_picker.png'}")
