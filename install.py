"""ComfyUI-Manager install hook: install the pack's requirements into ComfyUI's Python (idempotent)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

# pip name -> import name; torch/torchvision are ComfyUI's own and never touched here.
PACKAGES = {"numpy": "numpy", "pillow": "PIL", "safetensors": "safetensors", "faiss-cpu": "faiss", "open_clip_torch": "open_clip"}


def main() -> int:
    missing = [pip_name for pip_name, mod in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        print("[NoiseQuery] requirements already installed")
        return 0
    req = Path(__file__).resolve().parent / "requirements.txt"
    print(f"[NoiseQuery] installing {', '.join(missing)} from {req}")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-r", str(req)])


if __name__ == "__main__":
    sys.exit(main())
