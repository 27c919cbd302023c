#!/usr/bin/env bash
# README command 2: set up .venv, then lint (ruff), type-check noisequery_core + nodes (mypy, Python 3.10) and run pytest.
# Real-ComfyUI tests run when a checkout is at $COMFYUI_PATH or ~/ComfyUI, and skip (with the reason) otherwise.
# With CI set (as .ci/run is run) or NOISEQUERY_HOST_SETUP=1, scripts/_host_setup.sh first makes sure the host is
# there (unpacks the ComfyUI snapshot, installs chromium, downloads the newest frontend) and every skip of a
# host or browser test becomes a failure.
source "$(dirname "$0")/_env.sh"
"${PIP[@]}" -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" >&2 || true
case "${CI:-}" in
  ""|0|false|False|FALSE|no) NQ_CI="" ;;
  *) NQ_CI=1 ;;
esac
if [ -n "$NQ_CI" ] || [ "${NOISEQUERY_HOST_SETUP:-}" = 1 ]; then
  echo "[setup] CI=${CI:-} NOISEQUERY_HOST_SETUP=${NOISEQUERY_HOST_SETUP:-}: setting up the host; host/browser skips fail" >&2
  source "$ROOT/scripts/_host_setup.sh"
fi
HOST="${COMFYUI_PATH:-$HOME/ComfyUI}"
if [ -f "$HOST/main.py" ] && [ -f "$HOST/requirements.txt" ]; then
  echo "[setup] ComfyUI found at $HOST: installing its requirements for the host tests" >&2
  grep -vE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$HOST/requirements.txt" > "$VENV/comfyui-requirements.txt"
  "${PIP[@]}" -r "$VENV/comfyui-requirements.txt" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  export COMFYUI_PATH="$HOST"
else
  echo "[setup] no ComfyUI checkout at $HOST: host tests will be skipped (see README 'Tests')" >&2
fi
echo "[lint] ruff" >&2
"$PY" -m ruff check .
echo "[types] mypy noisequery_core + nodes (Python 3.10)" >&2
"$PY" scripts/typecheck.py
echo "[tests] pytest tests" >&2
set +e
"$PY" -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
