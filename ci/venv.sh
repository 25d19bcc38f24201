# Sourced by the ci/ scripts that need Python packages (s3.sh, interop.sh, tensorboard.sh,
# bench_cpu.sh).
#
# cached_venv NAME IMPORTS WHAT INSTALL_FN: sets VENV to a venv cached under
# ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}/NAME whose python imports IMPORTS (a Python import
# statement), making it once with `INSTALL_FN` (called with VENV set, after pip is upgraded).
# When the venv is not there and no package registry can be reached it says loudly that WHAT
# is skipped and returns 1; the caller decides what a skip means.
cached_venv() {
  local name=$1 imports=$2 what=$3 install=$4
  local cache="${MOSAIC_CI_CACHE:-$HOME/.cache/mosaic-ci}"
  VENV="$cache/$name"
  if "$VENV/bin/python" -c "$imports" 2>/dev/null; then
    return 0
  fi
  local probe
  probe=$(mktemp -d)
  if ! timeout 60 python3 -m pip download -q --no-deps --dest "$probe" six >/dev/null 2>&1; then
    rm -rf "$probe"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!! SKIPPED: $what"
    echo "!! (no package registry reachable to install its Python packages)"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    return 1
  fi
  rm -rf "$probe"
  mkdir -p "$cache"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$install"
}

# interop_python WHAT: sets PY to a Python with torch, diffusers and peft: INTEROP_PYTHON if set,
# else the interop-venv cached venv (torch's CPU wheels when download.pytorch.org answers, else
# PyPI's). Returns 1 (after the loud message) when it cannot be made; WHAT names the skipped job.
interop_python() {
  PY="${INTEROP_PYTHON:-}"
  [ -n "$PY" ] && return 0
  install_interop() {
    timeout 300 "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
      || "$VENV/bin/python" -m pip install -q torch
    "$VENV/bin/python" -m pip install -q "diffusers==0.42.1" "peft==0.21.2" safetensors
  }
  cached_venv interop-venv "import torch, diffusers, peft, safetensors" "$1" install_interop || return 1
  PY="$VENV/bin/python"
}
