#!/usr/bin/env bash
# Every GPU check in one run, for a device lent briefly (docs/gpu.md):
#   a. correctness: the GPU test variants (rows op, frozen linear, chunked attention), one
#      tiny training step on the GPU against the CPU in f32 and bf16, compute-sanitizer on the
#      rows kernel;
#   b. a 30-step tiny run through `launcher` (NCCL, world size 1), stopped by SIGTERM and resumed;
#   c. FLUX.1-dev steps (seeded random weights made on the GPU, bf16 base, f32 LoRA rank 128,
#      recomputation on): 512 px with 1 and 3 references, losses on and off, a per-phase
#      profile, and 1024 px with 6;
#   d. the rows op against the official full maps at FLUX.1-dev sizes;
#   e. the PyTorch baseline (ci/gpu/torch_baseline.py) at the same sizes.
# Each step has its own time limit, cut to what is left of BUDGET_S (default 420 s on a GPU);
# a step with under 15 s left is skipped. A failed step is recorded and the next one runs,
# most important first. Results:
# $OUT/gpu-report.md, $OUT/gpu-report.json, and each step's log under $OUT/logs.
#
#   ci/gpu/run.sh          on the GPU machine, from the repository root, carrying gpu-kit/
#                          (made by ci/gpu/build.sh); at most 8 minutes on an H100/H200
#   STEPS=REGEX ci/gpu/run.sh   only the steps whose names match (a second try after a fix)
#   ci/gpu/run.sh --cpu    the same steps with the CPU build (target/debug) at tiny sizes: proves
#                          the plumbing and the report in CI (BIN=... picks other binaries)
set -uo pipefail
cd "$(dirname "$0")/../.."
source ci/gpu/kit.sh
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs"
RES="$OUT/results.jsonl"
: > "$RES"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
if [ "$MODE" = gpu ]; then BUDGET_S=${BUDGET_S:-420}; else BUDGET_S=${BUDGET_S:-1200}; fi

# One step: NAME LIMIT_S COMMAND... ; its status, time and log tail go into results.jsonl.
step() {
  local name=$1 limit=$2
  shift 2
  local start rc left
  if [ -n "${STEPS:-}" ] && ! [[ $name =~ $STEPS ]]; then return; fi
  left=$(( T0 + BUDGET_S - $(date +%s) ))
  if [ "$left" -lt 15 ]; then skip "$name" "out of the ${BUDGET_S} s budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$(date +%s.%N)
  echo "== [$((  $(date +%s) - T0 )) s] $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && grep -q "not run: no CUDA device" "$OUT/logs/$name.log"; then rc=3; fi
  python3 - "$name" "$rc" "$start" "$limit" "$OUT/logs/$name.log" >> "$RES" <<'EOF'
import json, sys, time
name, rc, start, limit, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
tail = open(log, errors="replace").read().splitlines()[-12:]
print(json.dumps({"kind": "step", "name": name, "rc": rc, "seconds": round(time.time() - start, 1),
                  "limit_s": int(limit), "timed_out": rc in (124, 137), "tail": tail}))
EOF
  if [ $rc -eq 0 ]; then tail -3 "$OUT/logs/$name.log"; else grep -v '^ *[0-9]*: \|^ *at ' "$OUT/logs/$name.log" | tail -15; fi | sed 's/^/   /'
  echo "   -> rc $rc"
}
skip() {
  if [ -n "${STEPS:-}" ] && ! [[ $1 =~ $STEPS ]]; then return; fi
  printf '{"kind": "step", "name": "%s", "rc": null, "skipped": "%s"}\n' "$1" "$2" >> "$RES"
  echo "== $1: skipped ($2)"
}

if [ "$MODE" = gpu ]; then
  gpu_kit_libraries
  BIN="$WORK/bin"
  gpu_kit_unpack "$BIN"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  echo "profilers: nsys=$(command -v nsys || echo none) ncu=$(command -v ncu || echo none)" >> "$OUT/gpu.txt"
  DEVICE_SETS=(--set 'model.device="cuda"')
  PY=python3
  PYDEV=cuda
else
  BIN=${BIN:-target/debug}
  echo "cpu (mode --cpu), $(nproc) cores" > "$OUT/gpu.txt"
  DEVICE_SETS=(--set 'model.device="cpu"')
  PY=${BASELINE_PYTHON:-}
  if [ -z "$PY" ]; then
    for p in "${MOSAIC_CI_CACHE:-$HOME/.cache/mosaic-ci}/interop-venv/bin/python" python3; do
      if "$p" -c "import torch, diffusers, peft" 2>/dev/null; then PY=$p; break; fi
    done
  fi
  PYDEV=cpu
fi
for b in trainer launcher; do
  [ -x "$BIN/$b" ] || { echo "run.sh: $BIN/$b is missing (GPU: run ci/gpu/build.sh; CPU: cargo build --bins)"; exit 1; }
done

# The tiny preset from its seeded random init (not the committed base), 16 caption tokens.
TINY=(--config configs/tiny-cpu.toml --set 'model.weights=""' --set data.text_tokens=16
  --set 'data.source="synthetic"' --set train.progress=false --set validation.every=0)

# ---- a. correctness
if [ "$MODE" = gpu ]; then
  step kernels-gpu-tests 90 "$BIN/kernels-tests" cuda --nocapture
  step flux-gpu-tests 120 "$BIN/flux-tests" cuda --nocapture
else
  skip kernels-gpu-tests "CPU mode: the cuda test variants are built only with --features cuda"
  skip flux-gpu-tests "CPU mode"
fi
for dt in f32 bf16; do
  for ckpt in false true; do
    step "check-device-$dt-recompute-$ckpt" 90 "$BIN/trainer" check-device "${TINY[@]}" "${DEVICE_SETS[@]}" \
      --set "model.dtype=\"$dt\"" --set "train.checkpointing=$ckpt" --set "run.dir=\"$WORK/check-$dt-$ckpt\"" \
      --set data.samples=4 --set data.min_refs=2 --set data.max_refs=2 --json "$RES"
  done
done
# The official recipe: every pair, pooled SCAL, JSD of the rows of every reference token (the
# rows op with every reference token as a query).
OFFICIAL=(--set loss.points_per_ref=0 --set 'loss.scal_reduce="pooled"' --set 'loss.mdl_rows="all-tokens"'
  --set 'loss.mdl_divergence="jsd"' --set loss.supervise_dropped_refs=true)
step "check-device-f32-official" 90 "$BIN/trainer" check-device "${TINY[@]}" "${DEVICE_SETS[@]}" "${OFFICIAL[@]}" \
  --set 'model.dtype="f32"' --set "run.dir=\"$WORK/check-official\"" \
  --set data.samples=4 --set data.min_refs=2 --set data.max_refs=2 --json "$RES"

# ---- b. launcher: 30 steps, SIGTERM after 12 logged, resume to the end; the loss must fall
resume_run() {
  local dir=$1 ranks=$2
  shift 2
  local args=(--config configs/tiny-cpu.toml --nproc-per-node "$ranks" --stop-timeout 30 --
    --set 'model.weights=""' --set data.text_tokens=16
    --set 'data.source="synthetic"' --set train.progress=false --set validation.every=0 --set "run.dir=\"$dir\""
    --set train.max_steps=30 --set checkpoint.every=5 --set train.log_every=5 --set data.samples=16 "$@")
  "$BIN/launcher" "${args[@]}" & local pid=$!
  for _ in $(seq 1 600); do
    [ "$(wc -l < "$dir/metrics.jsonl" 2>/dev/null || echo 0)" -ge 12 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.2
  done
  kill -TERM $pid 2>/dev/null
  wait $pid
  echo "stopped at $(wc -l < "$dir/metrics.jsonl") logged steps; resuming"
  "$BIN/launcher" "${args[@]}" || return 1
  python3 - "$dir/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r["step"] for r in rows]
first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
print(f"steps logged {len(rows)} (last {steps[-1]}), loss {first:.4f} -> {last:.4f} (mean of the last 5)")
assert steps == list(range(1, 31)), f"steps 1..30 expected once each after the resume, got {steps}"
assert last < first, "loss did not fall"
EOF
}
export -f resume_run
export BIN
if [ "$MODE" = gpu ]; then
  step launcher-nccl-resume 90 bash -c "resume_run '$WORK/launch' 1 --set 'model.device=\"cuda\"' --set 'distributed.backend=\"nccl\"'"
else
  step launcher-tcp-resume 300 bash -c "resume_run '$WORK/launch' 2"
fi

# ---- c. step benchmarks, and e. the PyTorch baseline beside each
bench() { # LABEL PX REFS EXTRA_LIMIT [extra trainer args...]
  local label=$1 px=$2 refs=$3 limit=$4
  shift 4
  if [ "$MODE" = gpu ]; then
    local sets=(--config configs/mosaic-paper-512.toml --set 'model.weights=""' --set 'model.init="device"'
      --set 'data.source="synthetic"' --set 'data.cache=""' --set 'data.encoders=""' --set data.samples=4
      --set data.drop_refs=0 --set data.drop_text=0 --set data.drop_both=0)
  else
    local sets=(--config configs/tiny-cpu.toml --set 'model.weights=""' --set data.text_tokens=16
      --set 'model.preset="tiny"' --set 'data.source="synthetic"'
      --set data.samples=4 --set lora.rank=8 --set train.checkpointing=true --set 'model.device="cpu"')
  fi
  # Batch 1 on both sides (torch_baseline.py's default): report.py refuses a ratio otherwise.
  step "bench-$label" "$limit" "$BIN/trainer" bench-step "${sets[@]}" --set train.progress=false \
    --set train.batch_size=1 --set train.grad_accum=1 \
    --set "run.dir=\"$WORK/bench-$label\"" --set "data.resolution=$px" --set "data.ref_resolution=$px" \
    --set "data.min_refs=$refs" --set "data.max_refs=$refs" --label "$label" --json "$RES" "$@"
}
torch_bench() { # LABEL PX REFS LIMIT [extra args...]
  local label=$1 px=$2 refs=$3 limit=$4
  shift 4
  if [ -z "$PY" ]; then skip "torch-$label" "no Python with torch, diffusers and peft"; return; fi
  local args=(--px "$px" --refs "$refs" --device "$PYDEV" --label "$label" --json "$RES")
  if [ "$MODE" = gpu ]; then
    args+=(--preset flux-dev --dtype bf16 --rank 128)
  else
    args+=(--preset tiny --dtype f32 --rank 8 --text-tokens 16 --threads 2)
  fi
  step "torch-$label" "$limit" env LD_LIBRARY_PATH="${ORIG_LD_LIBRARY_PATH-${LD_LIBRARY_PATH:-}}" \
    PYTHONPATH="$WORK/py${PYTHONPATH:+:$PYTHONPATH}" "$PY" ci/gpu/torch_baseline.py "${args[@]}" "$@"
}
if [ "$MODE" = gpu ] && ! python3 -c "import diffusers" 2>/dev/null; then
  # The machine has torch and peft but no diffusers and no network: install the kit's wheel.
  python3 -m pip install -q --no-deps --target "$WORK/py" gpu-kit/wheels/*.whl > "$OUT/logs/pip.log" 2>&1
  if ! PYTHONPATH="$WORK/py" python3 -c "from diffusers import FluxTransformer2DModel; import peft" >> "$OUT/logs/pip.log" 2>&1; then
    echo "diffusers does not import with the machine's huggingface_hub: adding the kit's" >> "$OUT/logs/pip.log"
    python3 -m pip install -q --no-deps --target "$WORK/py" gpu-kit/wheels/extra/*.whl >> "$OUT/logs/pip.log" 2>&1
  fi
fi
NO_LOSSES=(--set loss.scal_weight=0 --set loss.mdl_weight=0 --set 'loss.double_blocks=[]' --set 'loss.single_blocks=[]')
if [ "$MODE" = gpu ]; then
  bench 512px-1ref 512 1 120
  bench 512px-1ref-nolosses 512 1 90 "${NO_LOSSES[@]}"
  bench 512px-1ref-composed 512 1 90 --set 'model.kernels="composed"'
  bench 512px-1ref-plainrows 512 1 90 --set 'loss.rows="plain"'
  torch_bench 512px-1ref 512 1 120
  bench 512px-3ref 512 3 120
  torch_bench 512px-3ref 512 3 120
  bench 512px-1ref-profile 512 1 90 --profile --steps 2
  bench 512px-1ref-fullattention 512 1 90 --set 'model.attention="full"'
  bench 512px-1ref-norecompute 512 1 90 --set train.checkpointing=false
  bench 512px-3ref-nolosses 512 3 90 "${NO_LOSSES[@]}"
  bench 512px-3ref-official 512 3 120 "${OFFICIAL[@]}" --set 'loss.double_blocks="all"' --set loss.mdl_weight=1.0
  step rows-vs-official 90 "$BIN/trainer" bench-rows --device cuda
else
  bench 128px-1ref 128 1 120
  bench 128px-1ref-nolosses 128 1 120 "${NO_LOSSES[@]}"
  torch_bench 128px-1ref 128 1 180
  bench 128px-2ref 128 2 120
  bench 128px-2ref-profile 128 2 120 --profile --steps 2
  skip rows-vs-official "CPU mode: \`trainer bench-rows\` prints the CPU table (minutes at FLUX.1-dev sizes)"
fi

# ---- sampling: s/image at 512 px, 28 steps, 1/2/4 references, with and without the reference
# cache (FLUX.1-dev dimensions, random weights, tiny encoders and decoder) beside the paper's
# 1.53 s/it on an H20
if [ "$MODE" = gpu ]; then
  step bench-sample 240 "$BIN/trainer" bench-sample --config configs/mosaic-paper-512.toml \
    --set 'model.weights=""' --set 'model.init="device"' --set 'data.encoders=""' --set 'model.device="cuda"' \
    --set 'model.dtype="bf16"' --refs 1,2,4 --json "$OUT/bench-sample.jsonl"
else
  step bench-sample 120 "$BIN/trainer" bench-sample --config configs/tiny-cpu.toml --size 64 --steps 4 \
    --set 'model.weights=""' --set data.text_tokens=16 \
    --refs 1,2 --json "$OUT/bench-sample.jsonl"
fi

# ---- the kernels behind one step, when the machine has Nsight Systems: the 40 that take the
# most GPU time, as nsys' cuda_gpu_kern_sum table in $OUT/gpu-kernels.txt
if [ "$MODE" = gpu ] && command -v nsys > /dev/null; then
  nsys_step() {
    nsys profile -q -t cuda -o "$WORK/step" --force-overwrite true "$BIN/trainer" bench-step "$@" &&
      nsys stats -q -r cuda_gpu_kern_sum -f csv -o "$WORK/kern" "$WORK/step.nsys-rep" &&
      head -41 "$WORK"/kern*.csv > "$OUT/gpu-kernels.txt"
  }
  export -f nsys_step
  export WORK OUT
  step nsys-512px-1ref 120 bash -c 'nsys_step "$@"' _ --config configs/mosaic-paper-512.toml --set 'model.weights=""' \
    --set 'model.init="device"' --set 'data.source="synthetic"' --set 'data.cache=""' --set 'data.encoders=""' \
    --set data.samples=4 --set train.progress=false --set "run.dir=\"$WORK/nsys\"" --set 'model.device="cuda"' \
    --set data.min_refs=1 --set data.max_refs=1 --warmup 1 --steps 1 --label nsys
else
  skip nsys-512px-1ref "no GPU or no nsys"
fi
# The largest case last: a long step that may not fit.
[ "$MODE" = gpu ] && bench 1024px-6ref 1024 6 200 --warmup 0 --steps 1

# ---- a (last: the slowest check, and the one a runtime may refuse)
if [ "$MODE" = gpu ] && command -v compute-sanitizer > /dev/null; then
  step sanitizer-rows 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$BIN/kernels-tests" cuda_rows
else
  skip sanitizer-rows "no GPU or no compute-sanitizer"
fi

python3 ci/gpu/report.py "$RES" "$OUT/gpu.txt" "$MODE" "$OUT/gpu-report.md" "$OUT/gpu-report.json"
status=$?
if grep -q '^|' "$OUT/logs/bench-sample.log" 2>/dev/null; then
  { echo; echo "## Sampling (trainer bench-sample; the paper: 1.53 s/it on an H20)"; echo
    grep '^|' "$OUT/logs/bench-sample.log"; } >> "$OUT/gpu-report.md"
fi
# One file for all logs: a device run brings back only a few files.
for f in "$OUT"/logs/*.log; do echo "===== $(basename "$f")"; cat "$f"; done > "$OUT/logs.txt" 2>/dev/null
rm -rf "$OUT/logs"
echo "== [$(( $(date +%s) - T0 )) s] report: $OUT/gpu-report.md"
cat "$OUT/gpu-report.md"
exit $status
