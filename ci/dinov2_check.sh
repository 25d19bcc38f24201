#!/usr/bin/env bash
# DINOv2 at facebook/dinov2-base's size: `trainer eval --dino` against transformers on the eval
# fixture's cases (ci/dinov2_check.py). Python: INTEROP_PYTHON or the interop venv (ci/venv.sh;
# transformers comes with peft); skipped loudly only when no package registry can be reached.
#   ci/dinov2_check.sh [TRAINER]   (default target/debug/trainer)
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/venv.sh
interop_python "DINOv2 at dinov2-base's size against transformers" || exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" ci/dinov2_check.py "${1:-target/debug/trainer}" trainer/tests/fixtures/eval "$work"
