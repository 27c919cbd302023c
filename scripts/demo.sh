#!/usr/bin/env bash
# README command 1: set up .venv and run the main job on its embedded default (no downloads):
# synthetic seed images -> library -> colour, layout and text queries -> demo_out/contact_sheet.png
source "$(dirname "$0")/_env.sh"
"${PIP[@]}" -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" >&2 || true
exec "$PY" -m noisequery_core demo --out "${1:-demo_out}"
