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
source ci/venv.sh
interop_python "interop check (diffusers/PEFT loading of our export)" || exit 0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run -q -p trainer -- export --checkpoint "$run_dir" --out "$out" --format all
"$PY" ci/interop.py "$out" ${base_dir:+"$base_dir"}
