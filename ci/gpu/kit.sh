# Sourced by the device scripts (run.sh, tiny_base.sh): the kit's binaries and the CUDA
# libraries they link at run time.

# Unpacks gpu-kit/*.xz (ci/gpu/build.sh) into folder $1.
gpu_kit_unpack() {
  mkdir -p "$1"
  python3 - gpu-kit "$1" <<'PY'
import lzma, os, pathlib, shutil, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted(src.glob("*.xz")):
    out = dst / f.stem
    with lzma.open(f) as i, open(out, "wb") as o:
        shutil.copyfileobj(i, o)
    os.chmod(out, 0o755)
    print("unpacked", out.name, out.stat().st_size)
PY
}

# Puts the machine's NVIDIA wheel libraries on LD_LIBRARY_PATH for our binaries (candle links
# the CUDA libraries dynamically) and keeps the path as it was in ORIG_LD_LIBRARY_PATH: the
# PyTorch baseline runs with that one, since torch loads its own libraries and a mixed set gave
# illegal memory accesses inside cuBLAS on the first device run.
gpu_kit_libraries() {
  ORIG_LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
  LD_LIBRARY_PATH="$(python3 -c 'import nvidia,glob,os;print(":".join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p+"/*/lib/lib*.so*")})))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH ORIG_LD_LIBRARY_PATH
}
