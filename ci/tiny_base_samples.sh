#!/usr/bin/env bash
# The README's picture of what the tiny base draws (docs/tiny-world/base-samples.png): six
# captions of training-subject scenes, seeds 1 and 2 side by side, two captions per row, each
# sample 128 px from the base alone (no references, no LoRA; guidance 1 as it was trained).
# Usage: ci/tiny_base_samples.sh [BASE_DIR] [OUT_PNG]
#   default trainer/assets/tiny-base and docs/tiny-world/base-samples.png; BASE_DIR may be any
#   pretrain-base output (RUN/base, RUN/base-steps/step-N) to follow a pretraining.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-trainer/assets/tiny-base}
out=${2:-docs/tiny-world/base-samples.png}
. ci/venv.sh
interop_python "the tiny base's sample picture" || exit 1
cargo build --release --bin trainer
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
    target/release/trainer sample --config configs/tiny-cpu.toml --weights "$base" \
      --prompt "${prompts[$i]}" --guidance 1 --seed "$seed" --out "$f" >/dev/null
    files+=("$f")
  done
done
# Four samples per row: caption A seed 1, A seed 2, caption B seed 1, B seed 2.
"$PY" - "$out" "${files[@]}" <<'PY'
import sys
from PIL import Image
out, files = sys.argv[1], sys.argv[2:]
ims = [Image.open(f).convert("RGB") for f in files]
w, h = ims[0].size
sheet = Image.new("RGB", (4 * w, (len(ims) + 3) // 4 * h))
for i, im in enumerate(ims):
    sheet.paste(im, ((i % 4) * w, (i // 4) * h))
sheet.save(out)
print(f"wrote {out}")
PY
