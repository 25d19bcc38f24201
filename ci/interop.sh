#!/usr/bin/env bash
# Interoperability check of `trainer export`: diffusers, PEFT and diffusers' kohya converter
# load our files (ci/interop.py). Usage: ci/interop.sh RUN_DIR (a run with checkpoints).
#
# Python: INTEROP_PYTHON if set; else a venv cached under ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}
# with torch (CPU wheels when download.pytorch.org answers, else PyPI's), diffusers and peft.
# When no package registry can be reached the check is skipped with a loud message; any other
# failure fails.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="$1"
PY="${INTEROP_PYTHON:-}"
if [ -z "$PY" ]; then
  cache="${MOSAIC_CI_CACHE:-$HOME/.cache/mosaic-ci}"
  venv="$cache/interop-venv"
  PY="$venv/bin/python"
  if ! "$PY" -c "import torch, diffusers, peft, safetensors" 2>/dev/null; then
    probe=$(mktemp -d)
    if ! timeout 60 python3 -m pip download -q --no-deps --dest "$probe" six >/dev/null 2>&1; then
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      echo "!! SKIPPED: interop check (diffusers/PEFT loading of our export): no package   !!"
      echo "!! registry reachable to install torch, diffusers and peft.                  !!"
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      rm -rf "$probe"
      exit 0
    fi
    rm -rf "$probe"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$PY" -m pip install -q --upgrade pip
    timeout 300 "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
      || "$PY" -m pip install -q torch
    "$PY" -m pip install -q "diffusers==0.42.1" "peft==0.21.2" safetensors
  fi
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run -q -p trainer -- export --checkpoint "$run_dir" --out "$out" --format all
"$PY" ci/interop.py "$out"
