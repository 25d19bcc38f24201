#!/usr/bin/env bash
# Interoperability check of `trainer export`: diffusers, PEFT and diffusers' kohya converter
# load our files (ci/interop.py) onto the run's base as diffusers loads it. Usage: ci/interop.sh
# RUN_DIR [BASE_DIR] (a run with checkpoints; BASE_DIR: the diffusers folder of model.weights,
# none for a random tiny model).
#
# Python: INTEROP_PYTHON if set; else a venv cached under ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}
# with torch (CPU wheels when download.pytorch.org answers, else PyPI's), diffusers and peft.
# When no package registry can be reached the check is skipped with a loud message; any other
# failure fails.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="$1"
base_dir="${2:-}"
PY="${INTEROP_PYTHON:-}"
if [ -z "$PY" ]; then
  source ci/venv.sh
  install_interop() {
    timeout 300 "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
      || "$VENV/bin/python" -m pip install -q torch
    "$VENV/bin/python" -m pip install -q "diffusers==0.42.1" "peft==0.21.2" safetensors
  }
  cached_venv interop-venv "import torch, diffusers, peft, safetensors" \
    "interop check (diffusers/PEFT loading of our export)" install_interop || exit 0
  PY="$VENV/bin/python"
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run -q -p trainer -- export --checkpoint "$run_dir" --out "$out" --format all
"$PY" ci/interop.py "$out" ${base_dir:+"$base_dir"}
