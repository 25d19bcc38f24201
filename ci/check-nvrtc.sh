#!/usr/bin/env bash
# Compiles every kernels/src/*.cu (after common.cuh, as kernels/src/cuda.rs does) with NVRTC, as the trainer does at run time, on a
# machine without a GPU: NVRTC needs no driver. NVRTC comes from NVIDIA's CUDA 13.0 pip wheel
# (nvidia-cuda-nvrtc), installed once into ~/.cache/mosaic-ci/nvrtc unless one is found under
# $CUDA_PIP_CACHE. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=$(find "${CUDA_PIP_CACHE:-$HOME/.cache/cuda-pip}" "$HOME/.cache/mosaic-ci/nvrtc" -name 'libnvrtc.so.13' 2>/dev/null | head -1 || true)
if [ -z "$lib" ]; then
  python3 -m venv "$HOME/.cache/mosaic-ci/nvrtc"
  "$HOME/.cache/mosaic-ci/nvrtc/bin/pip" install -q nvidia-cuda-nvrtc==13.0.88
  lib=$(find "$HOME/.cache/mosaic-ci/nvrtc" -name 'libnvrtc.so.13' | head -1)
fi
test -f "$lib" || { echo "no NVRTC found" >&2; exit 1; }
cuda=$(dirname "$(dirname "$lib")")
for cu in kernels/src/*.cu; do
echo "== $cu"
LD_LIBRARY_PATH="$cuda/lib" python3 - "$lib" "$cu" <<'PY'
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
src = open(os.path.join(os.path.dirname(sys.argv[2]), "common.cuh"), "rb").read() + b"\n" + open(sys.argv[2], "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(sys.argv[2]).encode(), 0, None, None) == 0
for arch in (b"compute_80", b"compute_90"):
    opts = (ctypes.c_char_p * 1)(b"--gpu-architecture=" + arch)
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"NVRTC failed for {arch.decode()}:\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    print(f"NVRTC {arch.decode()}: ok, {size.value} bytes of PTX")
PY
done
