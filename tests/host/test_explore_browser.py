"""The variation explorer's click-to-pick loop in the real ComfyUI page (headless Chromium).

Runs scripts/explore_ui_check.py --no-pictures, which starts its own headless ComfyUI with the tiny checkpoint and
drives the page: Run, click variant #2 in the Variant Picker (the explorer's history widget must become exactly
the history the server offered), Run again (the server replays it: the walk is one pick longer), type a pick and
Run (the widget takes the returned history and `pick` goes back to -1). Skipped without a ComfyUI checkout,
Debian's /usr/bin/chromium or the playwright package.
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


def test_click_to_pick_loop_in_the_page(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "explore_ui_check.py"), "--no-pictures",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "click on variant #2 wrote the offered history" in out, out[-4000:]
    assert (tmp_path / "explore_picker.png").is_file()
    print(f"screenshot: {tmp_path / 'explore_picker.png'}")
