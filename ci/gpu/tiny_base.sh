#!/usr/bin/env bash
# Pretrains the tiny base on a lent GPU in one device run (docs/gpu.md, "The tiny base on a
# GPU"). A 2-core CPU pretrains it at about 15 samples/s, so the many hundreds of thousands of
# samples a base that draws the scenes' shapes needs take sessions there.
#   1. `datasets synth` + `datasets precompute` of SCENES scenes (default 32768, seed
#      SCENE_SEED 5: the scenes of the committed base's last runs) on the machine's cores, one
#      precompute part per core: the cache (about 23 KB a scene) is too large to carry;
#   2. `trainer pretrain-base --config configs/tiny-base.toml` on the GPU at batch BATCH
#      (default 256), with what the committed base's seven CPU runs taught as one run:
#      `loss.logit_mean=1.0` (more training at high noise, where the shapes are decided) and a
#      cosine to a hundredth of the lr (`optim.min_lr_ratio=0.01`; trainer/assets/tiny-base/
#      README.md), with the EMA's warmup (`optim.ema_warmup=true`: a run from random weights of a
#      few thousand steps would keep decay^steps of them in its average). A 30-step probe
#      measures the seconds per step, then the run proper gets the steps that fit in what is
#      left of BUDGET_S (default 480 s), so that its cosine schedule ends; a SIGTERM at the
#      budget's end stops it cleanly all the same, and it writes the base so far. Arguments
#      after the mode go to both runs (`--set optim.lr=2e-3`, `--set model.weights=...` to
#      continue a base);
#   3. `trainer shapes` on the base written (seeds 1-4, `--true-cfg 5`, the best of README's table):
#      shapes/shapes.json and shapes.png, the shape and colour accuracies also in summary.json;
#   4. $OUT/tiny-base/: the base (the EMA: config.json and diffusion_pytorch_model.safetensors),
#      metrics.jsonl, metrics.png, summary.json, shapes/, log.txt.
# Its samples, on the CPU machine: ci/tiny_base_samples.sh <files>/tiny-base OUT.png.
#
#   ci/gpu/tiny_base.sh [--set KEY=VALUE ...]        on the GPU machine, carrying gpu-kit/
#                                                    (ci/gpu/build.sh)
#   ci/gpu/tiny_base.sh --cpu [--set KEY=VALUE ...]  the same with the CPU build (target/debug,
#                                                    or BIN=) at tiny sizes: the plumbing, in CI
set -uo pipefail
cd "$(dirname "$0")/../.."
source ci/gpu/kit.sh
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then
  MODE=cpu
  shift
fi
OUT=${OUT:-$(mktemp -d)}
DEST="$OUT/tiny-base"
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
if [ "$MODE" = gpu ]; then
  BUDGET_S=${BUDGET_S:-480} SCENES=${SCENES:-32768} SCENE_SEED=${SCENE_SEED:-5} BATCH=${BATCH:-256} DEVICE=cuda
  gpu_kit_libraries
  BIN="$WORK/bin"
  gpu_kit_unpack "$BIN" > /dev/null
else
  BUDGET_S=${BUDGET_S:-90} SCENES=${SCENES:-64} SCENE_SEED=${SCENE_SEED:-1} BATCH=${BATCH:-4} DEVICE=cpu
  BIN=${BIN:-target/debug}
fi
for b in trainer datasets; do
  [ -x "$BIN/$b" ] || { echo "tiny_base.sh: $BIN/$b is missing (GPU: ci/gpu/build.sh; CPU: cargo build --bins)"; exit 1; }
done
exec > >(tee "$DEST/log.txt") 2>&1
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# ---- 1. the scenes and their cache, as README's "The tiny base" makes them
CORES=$(nproc)
say "$SCENES scenes (seed $SCENE_SEED), $CORES precompute parts"
"$BIN/datasets" synth --out "$WORK/synth" --samples "$SCENES" --seed "$SCENE_SEED" --size 160 --ref-size 160 \
  --max-refs 2 --row-group-rows 64 --rows-per-shard $(( (SCENES + CORES - 1) / CORES )) \
  --validation-cases 0 --heldout-samples 0 | tail -1 || exit 1
pids=()
for r in $(seq 0 $((CORES - 1))); do
  "$BIN/datasets" precompute --data "$WORK/synth" --out "$WORK/cache" --resolution 128 --ref-resolution 128 \
    --text-tokens 48 --context-dim 32 --pooled-dim 16 --seed 42 --part "$r/$CORES" > "$WORK/precompute-$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { cat "$WORK"/precompute-*.log; exit 1; }; done

# ---- 2. the probe, then the run proper
SETS=(--config configs/tiny-base.toml --set "data.url=\"$WORK/synth\"" --set "data.cache=\"$WORK/cache\""
  --set "model.device=\"$DEVICE\"" --set "train.batch_size=$BATCH" --set train.progress=false
  --set checkpoint.every=0 --set train.log_every=50
  --set loss.logit_mean=1.0 --set optim.min_lr_ratio=0.01 --set optim.ema_warmup=true)
say "probe: 30 steps of $BATCH"
"$BIN/trainer" pretrain-base "${SETS[@]}" --set "run.dir=\"$WORK/probe\"" --set train.max_steps=30 \
  --set optim.warmup_steps=10 "$@" > "$WORK/probe.log" 2>&1 || { tail -20 "$WORK/probe.log"; exit 1; }
left=$(( T0 + BUDGET_S - $(date +%s) ))
steps=$(python3 - "$WORK/probe/metrics.jsonl" "$left" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
s = sorted(r["s_per_step"] for r in rows[10:]) or [1.0]
# A tenth of what is left, and 20 s, for starting and writing the base.
print(max(10, int((int(sys.argv[2]) * 0.9 - 20) / s[len(s) // 2])))
EOF
)
say "run: $steps steps of $BATCH in the ${left} s left"
timeout --preserve-status -s TERM -k 30 $(( left > 30 ? left - 10 : 20 )) "$BIN/trainer" pretrain-base "${SETS[@]}" \
  --set "run.dir=\"$WORK/run\"" --set "train.max_steps=$steps" "$@"
rc=$?
cp "$WORK/run/base/"* "$WORK/run/metrics.jsonl" "$WORK/run/metrics.png" "$DEST/" 2>/dev/null

# ---- 3. whether the base draws the shapes (trainer shapes: every plain colour and shape)
if [ "$MODE" = gpu ]; then SHAPE_ARGS=(--seeds 4); else SHAPE_ARGS=(--seeds 1 --steps 4 --ceiling 8); fi
SHAPE_ARGS+=(--true-cfg 5)
say "shapes: ${SHAPE_ARGS[*]}"
"$BIN/trainer" shapes --config configs/tiny-cpu.toml --weights "$DEST" --set "model.device=\"$DEVICE\"" \
  "${SHAPE_ARGS[@]}" --out "$DEST/shapes" > "$WORK/shapes.log" 2>&1 || { tail -20 "$WORK/shapes.log"; exit 1; }
grep -v " INFO " "$WORK/shapes.log" | head -8

# ---- 4. what it did
python3 - "$WORK/run/metrics.jsonl" "$DEST/summary.json" "$MODE" "$SCENES" "$BATCH" "$rc" "$DEST/shapes/shapes.json" <<'EOF'
import json, os, sys
path, out, mode, scenes, batch, rc, shapes = sys.argv[1:]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
# The first steps (start-up, warm-up) are not the run's speed; a run of a few steps (CPU mode)
# keeps its second half. None where the run logged no step.
s = sorted(r["s_per_step"] for r in rows[min(10, len(rows) // 2):])
median = s[len(s) // 2] if s else None
tail = rows[-100:]
summary = {
    "mode": mode, "scenes": int(scenes), "batch": int(batch), "exit_code": int(rc),
    "steps": rows[-1]["step"] if rows else 0,
    "samples": (rows[-1]["step"] if rows else 0) * int(batch),
    "median_s_per_step": median,
    "samples_per_s": int(batch) / median if median else None,
    "loss_first_10": sum(r["loss"] for r in rows[:10]) / len(rows[:10]) if rows else None,
    "loss_last_100": sum(r["loss"] for r in tail) / len(tail) if tail else None,
}
if os.path.exists(shapes):
    measured = json.load(open(shapes))
    summary["shape_accuracy"] = measured["base"]["shape_accuracy"]
    summary["colour_accuracy"] = measured["base"]["colour_accuracy"]
    summary["shapes_true_cfg"] = measured["true_cfg"]
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps(summary))
EOF
say "the base and its curve: $DEST"
ls "$DEST"
# Stopped by the budget's SIGTERM, the trainer writes the base so far and exits with
# train.signal_exit_code (0 unless set), which --preserve-status passes on (plain timeout
# would say 124, and a run that ended well would read as failed).
[ $rc -eq 0 ]
