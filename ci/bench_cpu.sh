#!/usr/bin/env bash
# The CPU training step side by side with PyTorch (README "Step speed against PyTorch"): for each
# case, `trainer bench-step` and ci/gpu/torch_baseline.py (diffusers' FluxTransformer2DModel with
# a peft LoRA) run the same step: medium preset (8 heads x 64, 6 double + 12 single blocks),
# references at the target's size, 64 text tokens, batch 1, f32, LoRA rank 16 on the official
# targets, recomputation / gradient checkpointing on, warm-up then the median of N steps, on the
# same threads. Prints the table (s/step of both, the ratio, peak memory, GFLOP/s against the
# stated model FLOP count) and leaves the JSON lines in OUT/results.jsonl.
#
#   ci/bench_cpu.sh [--cases "256:1 256:2 512:1 512:2"] [--steps 3] [--warmup 1] [--threads 2]
#                   [--out DIR] [--profile]      # --profile: our per-phase table for each case
#
# Python: INTEROP_PYTHON, else ci/interop.sh's cached venv (ci/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cases="256:1 256:2 512:1 512:2"
steps=3 warmup=1 threads=2 out="" profile=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --profile) profile=(--profile); shift ;;
    *) echo "bench_cpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=${out:-$(mktemp -d)}
mkdir -p "$out"
res="$out/results.jsonl"
: > "$res"
source ci/venv.sh
interop_python "the PyTorch side of the step benchmark" || exit 1
cargo build -q --release -p trainer
for c in $cases; do
  px=${c%%:*} refs=${c##*:} label="medium-${c%%:*}px-${c##*:}ref"
  echo "== $label" >&2
  RAYON_NUM_THREADS=$threads target/release/trainer bench-step --config configs/tiny-cpu.toml \
    --set 'model.preset="medium"' --set 'model.weights=""' --set 'data.source="synthetic"' \
    --set data.samples=4 --set "data.resolution=$px" --set "data.ref_resolution=$px" \
    --set "data.min_refs=$refs" --set "data.max_refs=$refs" --set data.text_tokens=64 \
    --set train.batch_size=1 --set lora.rank=16 --set train.checkpointing=true \
    --set train.progress=false --set "run.dir=\"$out/run-$label\"" \
    --warmup "$warmup" --steps "$steps" --label "$label" --json "$res" "${profile[@]}" >&2
  "$PY" ci/gpu/torch_baseline.py --preset medium --px "$px" --refs "$refs" --text-tokens 64 \
    --batch 1 --rank 16 --threads "$threads" --warmup "$warmup" --steps "$steps" \
    --label "$label" --json "$res" >&2
done
python3 ci/gpu/report.py --bench-table "$res"
echo "(results: $res)" >&2
