#!/usr/bin/env bash
# Builds kto-train with the `cuda` feature on a machine without a GPU or a CUDA toolkit (CI does
# this so that the GPU code cannot rot): nvcc, headers and libraries come from PyPI's CUDA 13.0
# wheels (pinned: the H200 driver 580 is CUDA 13.0, and PTX from a newer nvcc would not load
# there), and the linker gets a libcuda.so stub exporting every cu* symbol of cudarc's driver
# bindings (candle builds cudarc with dynamic linking; the real driver library replaces the stub
# at run time). Recipe: the workplace's cuda-build probe (candle 0.11.1, proven on this machine).
#
#   scripts/build-cuda.sh             # -> target/cuda/release/kto-train
#   scripts/build-cuda.sh --features nccl   # with MPI + NCCL (one rank per GPU; needs Open MPI)
#   scripts/build-cuda.sh -- CMD...   # CMD in the same environment instead (e.g. cargo test
#                                     # --release --features cuda --target-dir target/cuda --no-run)
#   CUDA_COMPUTE_CAP=90 (default: sm_90a, H100/H200); WORK (default .cache/cuda-build)
#
# A cuda binary needs libcuda.so.1 (the driver) to start: it cannot run here, only build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-$ROOT/.cache/cuda-build}
VENV=$WORK/venv
CH=$WORK/cuda-home
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
mkdir -p "$WORK"

# 1. The toolkit from PyPI (about 1.2 GB installed; pip takes seconds at registry speed).
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
# NCCL (305 MB) only for a build of the `nccl` feature (scripts/build-cuda.sh --features nccl).
case " $* " in *nccl*)
    "$VENV/bin/python" -m pip install --quiet "nvidia-nccl-cu13==2.32.3" ;;
esac
CU13=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CU13/bin/nvcc" ] || { echo "no nvcc in $CU13/bin" >&2; exit 1; }

# 2. A CUDA_HOME-shaped folder: the wheel's bin/include/nvvm, unversioned library links (the
#    wheels ship only libX.so.N), and the libcuda stub.
rm -rf "$CH"
mkdir -p "$CH/lib"
for d in bin include nvvm; do ln -s "$CU13/$d" "$CH/$d"; done
ln -s lib "$CH/lib64"
NCCL_LIB=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "nccl", "lib"))')
for f in "$CU13"/lib/lib*.so.* "$NCCL_LIB"/lib*.so.*; do
    [ -e "$f" ] || continue
    b=$(basename "$f")
    ln -sf "$f" "$CH/lib/$b"
    ln -sf "$f" "$CH/lib/${b%%.so.*}.so"
done
cargo fetch --quiet
CUDARC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" |
    sed 's/^pub unsafe fn //' | sort -u |
    awk '{print "int " $1 "(void){return 999;}"}' >"$CH/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CH/lib/libcuda.so" "$CH/libcuda_stub.c"

# 3. The build, in its own target folder (the default build's stays as it is).
export PATH="$CH/bin:$PATH" CUDA_HOME="$CH" CUDA_PATH="$CH" CUDA_ROOT="$CH"
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
if [ "${1:-}" = "--" ]; then
    shift
    exec "$@"
fi
cargo build --release --features cuda --target-dir target/cuda "$@"
ls -la target/cuda/release/kto-train
