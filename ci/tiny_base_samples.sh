#!/usr/bin/env bash
# The README's picture of what the tiny base draws (docs/tiny-world/base-samples.png): six
# captions of training-subject scenes, seeds 1 and 2 side by side, two captions per row, each
# sample 128 px from the base alone (no references, no LoRA; guidance 1 as it was trained).
# Usage: ci/tiny_base_samples.sh [BASE_DIR] [OUT_PNG] [TRUE_CFG]
#   default trainer/assets/tiny-base, docs/tiny-world/base-samples.png and 1 (no classifier-free
#   guidance); BASE_DIR may be any pretrain-base output (RUN/base, RUN/base-steps/step-N) to
#   follow a pretraining; TRUE_CFG > 1 guides each sample against the empty caption
#   (`trainer sample --true-cfg`), which a base trained with caption dropout has learnt.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-trainer/assets/tiny-base}
out=${2:-docs/tiny-world/base-samples.png}
true_cfg=${3:-1}
. ci/venv.sh
interop_python "the tiny base's sample picture" || exit 1
cargo build --bins
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompts=(
  "red striped disc, blue ring" "green square"
  "yellow checked diamond, purple disc" "teal two-tone ring, orange square"
  "pink disc" "blue checked square, red diamond"
)
files=()
for i in "${!prompts[@]}"; do
  for seed in 1 2; do
    f="$work/$i-$seed.png"
    target/debug/trainer sample --config configs/tiny-cpu.toml --weights "$base" \
      --prompt "${prompts[$i]}" --guidance 1 --true-cfg "$true_cfg" --seed "$seed" --out "$f" >/dev/null
    files+=("$f")
  done
done
# Four samples per row: caption A seed 1, A seed 2, caption B seed 1, B seed 2.
"$PY" ci/sheet.py "$out" 4 0 "${files[@]}"
