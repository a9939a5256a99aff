#!/usr/bin/env bash
# Data parallelism on one machine: one process with 2 threads against 2 MPI ranks with 1 thread
# each, back to back, on the same work: SmolLM2-135M-Instruct (the real GGUF), the 64 real
# examples of benches/trl/real-unit-64.jsonl, global batch 4, max_length 512, LoRA r 16 on all
# seven projections, checkpointing on, STEPS optimizer steps (default 6). Figure: examples/s over
# the steps after the first (metrics.jsonl), and peak RSS per process.
#
#   scripts/bench-ranks.sh          # needs an `mpi` build (built here into target/mpi) and mpirun
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-6}
cargo build --release --quiet --features mpi --target-dir target/mpi
bin=target/mpi/release/kto-train
gguf=$(scripts/fetch-real-model.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
sets=(--set "model.name_or_path=\"$gguf\"" --set 'data.sources=[{kind="unpaired", files=["'"$PWD"'/benches/trl/real-unit-64.jsonl"]}]'
    --set data.validation_fraction=0.0 --set 'data.prompt_format="raw"' --set lora.dropout=0.0
    --set train.grad_accum=1 --set "train.max_steps=$STEPS" --set train.eval_every=0
    --set train.eval_on_start=false --set train.save_every=0 --set 'train.reference_cache="off"'
    --set train.activation_checkpointing=true --set train.max_length=512 --set eval.benchmarks=[])
rate() { # metrics.jsonl batch -> examples/s after the first step
    scripts/examples-per-second.py "$1" "$2" |
        python3 -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["examples_per_s"])'
}
echo "== 1 process x 2 threads, batch 4" >&2
RAYON_NUM_THREADS=2 /usr/bin/time -v "$bin" --config configs/smoke.toml "${sets[@]}" \
    --set train.batch_size=4 --set "output.dir=\"$work/one\"" --overwrite --quiet 2>"$work/one.log" ||
    { tail "$work/one.log"; exit 1; }
one=$(rate "$work/one/metrics.jsonl" 4)
rss1=$(awk -F: '/Maximum resident/ {printf "%.2f", $2 / 1048576}' "$work/one.log")
echo "== 2 ranks x 1 thread, batch 2 each" >&2
/usr/bin/time -v mpirun --oversubscribe -n 2 -x RAYON_NUM_THREADS=1 "$bin" --config configs/smoke.toml \
    "${sets[@]}" --set train.batch_size=2 --set "output.dir=\"$work/two\"" --overwrite --quiet \
    2>"$work/two.log" || { tail "$work/two.log"; exit 1; }
two=$(rate "$work/two/metrics.jsonl" 4)
# GNU time's figure for mpirun is the largest of its waited-for processes: one rank's peak.
rss2=$(awk -F: '/Maximum resident/ {printf "%.2f", $2 / 1048576}' "$work/two.log")
echo "| layout | examples/s | vs 1 x 2 threads | peak RSS |"
echo "|---|---|---|---|"
echo "| 1 process x 2 threads | $one | 1.00 | $rss1 GB |"
echo "| 2 ranks x 1 thread | $two | $(python3 -c "print(f'{$two / $one:.2f}')") | $rss2 GB per rank |"
