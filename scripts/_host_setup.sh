# Sourced by scripts/test.sh (after _env.sh) when CI is set or NOISEQUERY_HOST_SETUP=1: make sure the test host
# is there, so that no host or browser test can skip (tests/conftest.py turns such a skip into a failure).
#   1. a ComfyUI checkout: $COMFYUI_PATH, else ~/ComfyUI, else the snapshot <repo>/../shared/comfyui/
#      ComfyUI-0.8.0.tar.gz unpacked into ~ (override: NOISEQUERY_COMFYUI_SNAPSHOT); exports COMFYUI_PATH.
#      Its requirements are installed by test.sh. Never copied into the repository.
#   2. Debian's chromium (apt-get) when /usr/bin/chromium is missing (the path checked: NOISEQUERY_CHROMIUM_CHECK).
#   3. the newest comfyui-frontend-package wheel from PyPI, unzipped under ~/.cache/noisequery/frontend
#      (override: NOISEQUERY_FRONTEND_CACHE); exports NOISEQUERY_NEWEST_FRONTEND=<its static dir> and
#      NOISEQUERY_NEWEST_FRONTEND_VERSION, so the browser tests run against it as well as the pinned one.
# Exports NOISEQUERY_REQUIRE_HOST=1. Expects ROOT and PY from _env.sh; runs under set -euo pipefail.

export NOISEQUERY_REQUIRE_HOST=1

_nq_is_comfy() { [ -n "$1" ] && [ -f "$1/main.py" ] && [ -d "$1/comfy" ]; }

# ---- 1. ComfyUI checkout --------------------------------------------------------------------------
if _nq_is_comfy "${COMFYUI_PATH:-}"; then
  echo "[host] ComfyUI checkout at \$COMFYUI_PATH=$COMFYUI_PATH" >&2
else
  if [ -n "${COMFYUI_PATH:-}" ]; then
    echo "[host] \$COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI checkout (main.py + comfy/): using ~/ComfyUI" >&2
  fi
  if _nq_is_comfy "$HOME/ComfyUI"; then
    echo "[host] ComfyUI checkout at $HOME/ComfyUI" >&2
  else
    _nq_snapshot="${NOISEQUERY_COMFYUI_SNAPSHOT:-$ROOT/../shared/comfyui/ComfyUI-0.8.0.tar.gz}"
    if [ ! -f "$_nq_snapshot" ]; then
      echo "[host] no ComfyUI checkout at \$COMFYUI_PATH or $HOME/ComfyUI, and no snapshot at $_nq_snapshot:" \
           "the host tests cannot run" >&2
      exit 1
    fi
    rmdir "$HOME/ComfyUI" 2>/dev/null || true  # an empty folder (a clone that failed) is no obstacle
    if [ -e "$HOME/ComfyUI" ]; then
      echo "[host] $HOME/ComfyUI exists but is no ComfyUI checkout (main.py + comfy/): move it away" >&2
      exit 1
    fi
    echo "[host] unpacking $_nq_snapshot into $HOME (gives $HOME/ComfyUI)" >&2
    mkdir -p "$HOME"
    # unpack next to the target and rename, so an interrupted unpack never leaves a half checkout behind
    _nq_tmp="$(mktemp -d "$HOME/.ComfyUI.unpack.XXXXXX")"
    tar -xzf "$_nq_snapshot" -C "$_nq_tmp"
    if ! _nq_is_comfy "$_nq_tmp/ComfyUI"; then
      rm -rf "$_nq_tmp"
      echo "[host] $_nq_snapshot did not give a ComfyUI/ folder with main.py and comfy/" >&2
      exit 1
    fi
    mv "$_nq_tmp/ComfyUI" "$HOME/ComfyUI"
    rm -rf "$_nq_tmp"
  fi
  export COMFYUI_PATH="$HOME/ComfyUI"
fi

# ---- 2. Chromium ----------------------------------------------------------------------------------
_nq_chromium="${NOISEQUERY_CHROMIUM_CHECK:-/usr/bin/chromium}"
if [ -x "$_nq_chromium" ]; then
  echo "[host] browser: $_nq_chromium" >&2
else
  echo "[host] $_nq_chromium missing: installing Debian's chromium (apt-get)" >&2
  _nq_sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then _nq_sudo=(sudo -n); else
      echo "[host] not root and no sudo: cannot apt-get install chromium" >&2; exit 1
    fi
  fi
  if ! { "${_nq_sudo[@]}" apt-get update -qq >&2 &&
         "${_nq_sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends chromium >&2; }; then
    echo "[host] apt-get install chromium failed" >&2
    exit 1
  fi
  if [ ! -x /usr/bin/chromium ]; then
    echo "[host] apt-get installed chromium, but /usr/bin/chromium (what the browser tests use) is still missing" >&2
    exit 1
  fi
  echo "[host] browser: /usr/bin/chromium ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))" >&2
fi

# ---- 3. the newest comfyui-frontend-package -------------------------------------------------------
_nq_fe_cache="${NOISEQUERY_FRONTEND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/noisequery/frontend}"
mkdir -p "$_nq_fe_cache/wheels"
# No version given: pip asks PyPI for the newest release; a wheel already in the folder is not fetched again.
_nq_log="$(mktemp)"
if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
     comfyui-frontend-package -d "$_nq_fe_cache/wheels" >"$_nq_log" 2>&1; then
  grep -v "is ignored: it is neither" "$_nq_log" >&2 || true
  echo "[host] could not download the newest comfyui-frontend-package: using the newest wheel already cached" \
       "in $_nq_fe_cache/wheels, if any" >&2
else
  grep -v "is ignored: it is neither" "$_nq_log" >&2 || true
fi
rm -f "$_nq_log"
# The newest wheel in the cache, unzipped once (to <cache>/<version>/); older versions are pruned.
_nq_fe="$("$PY" - "$_nq_fe_cache" <<'PYEOF'
import shutil
import sys
import zipfile
from pathlib import Path

from packaging.version import Version

cache = Path(sys.argv[1])
wheels = sorted(cache.glob("wheels/comfyui_frontend_package-*.whl"), key=lambda p: Version(p.name.split("-")[1]))
if not wheels:
    sys.exit(0)
wheel, version = wheels[-1], wheels[-1].name.split("-")[1]
dest = cache / version
if not (dest / ".unpacked").is_file():
    tmp = cache / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    zipfile.ZipFile(wheel).extractall(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / ".unpacked").touch()
for old in wheels[:-1]:
    old.unlink()
for old in cache.iterdir():
    if old.is_dir() and old.name not in ("wheels", version):
        shutil.rmtree(old, ignore_errors=True)
print(version, dest / "comfyui_frontend_package" / "static", sep="\t")
PYEOF
)"
if [ -n "$_nq_fe" ] && [ -f "${_nq_fe#*$'\t'}/index.html" ]; then
  export NOISEQUERY_NEWEST_FRONTEND_VERSION="${_nq_fe%%$'\t'*}"
  export NOISEQUERY_NEWEST_FRONTEND="${_nq_fe#*$'\t'}"
  echo "[host] newest frontend: comfyui-frontend-package $NOISEQUERY_NEWEST_FRONTEND_VERSION" \
       "($NOISEQUERY_NEWEST_FRONTEND)" >&2
else
  echo "[host] no newest comfyui-frontend-package at hand: its browser tests will fail" >&2
fi
unset _nq_snapshot _nq_tmp _nq_chromium _nq_sudo _nq_fe_cache _nq_fe _nq_log
