#!/usr/bin/env bash
# Prepares, on a build machine, what a GPU machine without Rust or internet needs to run
# scripts/gpu-check.sh, in .gpu/ (ignored by git):
#
#   .gpu/bins.tar.xz  the `cuda` builds, stripped: kto-train, the fidelity suite as one test
#                     executable (tests/gpu_suite) and the step benchmark (benches/step.rs).
#                     Compressed together with a dictionary that spans all three (they share most
#                     of their code and candle's PTX): about 12 MB instead of about 200 MB.
#   .gpu/wheels/      trl and the packages of its that the GPU image lacks (datasets, dill,
#                     multiprocess), for its Python 3.12, so that TRL runs there too.
#
#   scripts/gpu-pack.sh    then, through the device tool:  carry [".gpu"], command
#                          "scripts/gpu-check.sh"  (everything travels in the 64 MiB the tool
#                          carries: the repository's tracked files are about 52 MB of it)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The builds (scripts/build-cuda.sh: PyPI's CUDA 13.0 toolkit, libcuda stub).
scripts/build-cuda.sh
exe() { # test|bench NAME -> that target's executable
    local profile=--release # cargo bench has its own (optimized) profile and no --release
    [ "$1" = bench ] && profile=
    scripts/build-cuda.sh -- cargo "$1" "--$1" "$2" $profile --features cuda \
        --target-dir target/cuda --no-run --message-format=json 2>"$work/build.log" |
        grep "\"kind\":\[\"$1\"\]" | grep "\"name\":\"$2\"" |
        grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4
}
suite=$(exe test gpu_suite)
step=$(exe bench step)
[ -x "$suite" ] && [ -x "$step" ] || {
    cat "$work/build.log" >&2
    exit 1
}
mkdir "$work/bins"
strip -o "$work/bins/kto-train" target/cuda/release/kto-train
strip -o "$work/bins/gpu_suite" "$suite"
strip -o "$work/bins/step" "$step"
tar -C "$work/bins" -cf - . | xz -T1 --lzma2=preset=9,dict=192MiB >.gpu/bins.tar.xz.tmp
mv .gpu/bins.tar.xz.tmp .gpu/bins.tar.xz

# 2. TRL for the GPU image's Python (3.12, manylinux x86-64): pure-Python wheels, and
#    multiprocess's per-version one. The versions are the ones the CPU comparison uses.
rm -f .gpu/wheels/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

du -b .gpu/bins.tar.xz .gpu/wheels/*.whl
total=$(( $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) + $(du -sb .gpu | cut -f1) ))
echo "tracked files + .gpu: $((total / 1048576)) MiB of the device tool's 64 MiB"
