# Sourced by scripts/demo.sh and scripts/test.sh: make .venv (Python 3.10+) with torch and the pack's needs.
# Idempotent: a second run only checks. Set PYTHON to choose the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch + torchvision into .venv (a few minutes the first time)" >&2
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  "$PY" -c "import torch, torchvision" || { echo "torch/torchvision failed to install into .venv" >&2; exit 1; }
fi
