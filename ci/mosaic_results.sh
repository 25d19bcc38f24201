#!/usr/bin/env bash
# The README's "What SCAL and MDL change" table: the main job (configs/tiny-cpu.toml on the
# committed tiny base, 2 ranks, 200 steps) in four settings x 3 seeds, each measured at its
# last validation (the live LoRA, not its EMA) on the held-out split (subjects training never
# shows):
#   base alone       optim.lr = 0 (the LoRA stays the identity; L_diff is the base's own)
#   L_diff only      loss.scal_weight = 0, loss.mdl_weight = 0
#   + SCAL           loss.mdl_weight = 0
#   + SCAL + MDL     the paper recipe (the config as shipped)
# Usage: ci/mosaic_results.sh [OUT_DIR] [SEEDS...]   (default runs/results, seeds 1 2 3)
# Needs the main job's data (README's first command: runs/data/tiny-synth, runs/data/tiny-cache).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results}
shift || true
seeds=("${@:-1 2 3}")
read -r -a seeds <<<"${seeds[*]}"
cargo build --bins
mkdir -p "$out"
declare -A settings=(
  [base]="--set optim.lr=0"
  [diff]="--set loss.scal_weight=0 --set loss.mdl_weight=0"
  [scal]="--set loss.mdl_weight=0"
  [scal-mdl]=""
)
for s in "${seeds[@]}"; do
  for name in base diff scal scal-mdl; do
    dir="$out/$name-seed$s"
    if grep -q '"measures"' "$dir/metrics.jsonl" 2>/dev/null && test -s "$dir/lora.safetensors"; then
      echo "== $dir: done before"
      continue
    fi
    echo "== $dir"
    # shellcheck disable=SC2086
    target/debug/launcher --config configs/tiny-cpu.toml -- --set "run.seed=$s" \
      --set "run.dir=\"$dir\"" --set checkpoint.overwrite=true --set train.progress=false \
      --set validation.every=200 --set validation.ema=false ${settings[$name]} >"$dir.log" 2>&1
  done
done
python3 ci/mosaic_results.py "$out" "${seeds[@]}"
# README's picture: seed 1's validation grids at its last step, base alone | paper recipe.
. ci/venv.sh
if interop_python "the validation grids picture"; then
  last=$(find "$out/base-seed${seeds[0]}/samples" -maxdepth 1 -name 'step-*' | sort | tail -1)
  "$PY" ci/sheet.py "$out/validation-grids.png" 2 16 "$last/grid.png" \
    "$out/scal-mdl-seed${seeds[0]}/samples/$(basename "$last")/grid.png"
fi
