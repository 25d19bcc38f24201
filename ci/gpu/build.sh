#!/usr/bin/env bash
# Builds the GPU kit on a machine without a GPU, into gpu-kit/ (git-ignored), for ci/gpu/run.sh:
#   - the CUDA `trainer` (feature cuda) and `launcher`, and `datasets`, release, stripped;
#   - the test binaries with GPU variants: kernels (rows op) and flux (frozen linear, chunked
#     attention), `cargo test --no-run --features cuda`, stripped;
#   - each xz-compressed (the CUDA kernels' PTX compresses about 8x);
#   - the diffusers wheel the PyTorch baseline needs (the GPU machine has torch and peft, no
#     diffusers and no network).
# It fails when the kit is above 56 MiB, which leaves room under the 64 MiB a device run carries.
#
# The CUDA toolchain: a CUDA toolkit whose nvcc is on PATH (candle's kernels are compiled for
# CUDA_COMPUTE_CAP, default 90: H100/H200), or BUILD_CUDA=path to a script that installs a
# pinned nvcc and prints the environment for it when run with CUDA_ENV_ONLY=1 (what a machine
# without a toolkit uses). The release build goes to target/cuda so it never disturbs the CPU
# build.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=gpu-kit
LIMIT_MIB=56
if [ -n "${BUILD_CUDA:-}" ]; then
  if [ ! -x "$BUILD_CUDA" ]; then
    echo "build.sh: BUILD_CUDA=$BUILD_CUDA is not an executable script" >&2
    exit 1
  fi
  eval "$(CUDA_ENV_ONLY=1 "$BUILD_CUDA")"
elif ! command -v nvcc > /dev/null; then
  echo "build.sh: no nvcc on PATH; install a CUDA toolkit, or set BUILD_CUDA to a script that" \
    "prints the environment of one (CUDA_ENV_ONLY=1)" >&2
  exit 1
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
rm -rf "$KIT"
mkdir -p "$KIT/wheels"

# Executables of a cargo invocation, from its JSON messages.
executables() {
  cargo "$@" --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

mib() { python3 -c "import os,sys;print(f'{os.path.getsize(sys.argv[1])/2**20:.1f}')" "$1"; }
pack() { # NAME PATH
  strip "$2" -o "$KIT/$1"
  local stripped
  stripped=$(mib "$KIT/$1")
  xz -T0 -6 -f "$KIT/$1"
  echo "  $1: $stripped MiB stripped -> $(mib "$KIT/$1.xz") MiB packed"
}

echo "== CUDA trainer and launcher, and datasets (ci/gpu/tiny_base.sh makes its data on the machine)"
while read -r name path; do
  case "$name" in trainer | launcher | datasets) pack "$name" "$path" ;; esac
done < <(executables build --release --features trainer/cuda -p trainer -p launcher -p datasets --bins)

echo "== GPU test variants (kernels, flux)"
while read -r name path; do
  pack "$name-tests" "$path"
done < <(executables test --release --no-run --features kernels/cuda,flux/cuda -p kernels -p flux --lib)

echo "== diffusers wheel for the PyTorch baseline"
# The version the CPU baseline was checked with; huggingface_hub too, in case the machine's is
# older than diffusers needs (run.sh adds it only then).
python3 -m pip download -q --no-deps --only-binary=:all: --dest "$KIT/wheels" "diffusers==0.42.1"
mkdir -p "$KIT/wheels/extra"
python3 -m pip download -q --no-deps --only-binary=:all: --dest "$KIT/wheels/extra" "huggingface_hub>=1.32,<2"
ls -1R "$KIT/wheels"

total=$(du -sb "$KIT" | cut -f1)
printf 'kit: %.1f MiB in %s (limit %d MiB)\n' "$(python3 -c "print($total/2**20)")" "$KIT" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "build.sh: the kit is above ${LIMIT_MIB} MiB" >&2
  exit 1
fi
