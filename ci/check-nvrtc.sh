#!/usr/bin/env bash
# Compiles kernels/src/attention_rows.cu with NVRTC, as the trainer does at run time, on a
# machine without a GPU: NVRTC needs no driver. Uses the CUDA 13.0 wheels that
# ../shared/gpu/build-cuda.sh caches (run it once); not part of CI (those wheels are large).
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=$(dirname "$(dirname "$(find "${CUDA_PIP_CACHE:-$HOME/.cache/cuda-pip}" -name nvcc -type f | head -1)")")
test -f "$cuda/lib/libnvrtc.so.13" || { echo "no NVRTC found; run ../shared/gpu/build-cuda.sh --check first" >&2; exit 1; }
LD_LIBRARY_PATH="$cuda/lib" python3 - "$cuda/lib/libnvrtc.so.13" kernels/src/attention_rows.cu <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
src = open(sys.argv[2], "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"attention_rows.cu", 0, None, None) == 0
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
