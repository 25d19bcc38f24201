#!/usr/bin/env bash
# TensorBoard's own reader (EventAccumulator) on our event files: the main job's run (every step
# scalar, every validation grid), and a run resumed from an earlier checkpoint, whose first new
# step must replace the steps the previous process had written after it (ci/tensorboard_check.py).
# Usage: ci/tensorboard.sh RUN_DIR (the main job's run).
#
# Python: a venv with tensorboard cached under ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}. When no
# package registry can be reached the check is skipped with a loud message; any other failure
# fails.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="$1"
source ci/venv.sh
install_tensorboard() { "$VENV/bin/python" -m pip install -q "tensorboard==2.21.0"; }
cached_venv tensorboard-venv "import tensorboard" \
  "TensorBoard check (EventAccumulator reading our event files)" install_tensorboard || exit 0
PY="$VENV/bin/python"
"$PY" ci/tensorboard_check.py "$run_dir"

# A resumed run: 6 steps with checkpoints at 2, 4, 6, then again from step 4.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
train=(target/debug/trainer train --config configs/tiny-cpu.toml --set 'model.weights=""' --set data.text_tokens=16
  --set 'data.source="synthetic"'
  --set validation.every=0 --set train.progress=false --set "run.dir=\"$work\""
  --set checkpoint.every=2 --set train.max_steps=6)
"${train[@]}" > "$work/first.log" 2>&1
"${train[@]}" --set "checkpoint.resume_from=\"$work/checkpoints/step-00000004\"" > "$work/second.log" 2>&1
test "$(ls "$work/tb" | wc -l)" -eq 2
"$PY" ci/tensorboard_check.py "$work"
