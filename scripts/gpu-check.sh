#!/usr/bin/env bash
# Everything a GPU machine should show about kto-train's CUDA path, in one unattended run of at
# most 8 minutes (a 450 s budget; each stage has its own time limit within what is left, and a
# failed or skipped stage is reported, not fatal):
#
#   1. the fidelity suite on the GPU (tests/gpu_suite with KTO_TRAIN_TEST_DEVICE=cuda: model
#      logits, the TRL KTO step with its 28 LoRA gradients, gradient checks, prefix reuse,
#      checkpointing, the fused ops against the CPU);
#   2. the step benchmark at SmolLM2-360M's shapes, 2 x (256 + 256), 8 x (512 + 512) and
#      8 x (1,024 + 1,024), checkpointing on, bf16, against TRL + PEFT on the same GPU;
#   3. the real-data unit (benches/trl/real-unit-64.jsonl: one epoch, batch 2, max_length 512)
#      at SmolLM2-135M's shapes, against TRL. The weights are random (the real model cannot
#      travel: the device tool carries 64 MiB): the work per step is the same as with the real
#      weights, the losses are not;
#   4. one table with ratios and peak GPU memory (nvidia-smi's memory.used sampled every 100 ms,
#      above what was in use before the run: the same measure for both systems).
#
# The GPU machine has no Rust and no internet: the binaries and TRL's missing wheels come
# prebuilt from scripts/gpu-pack.sh in $BUNDLE (default .gpu). Through the workplace's device
# tool: carry [".gpu"], command "scripts/gpu-check.sh" (results also land in $OUT).
#
#   DEVICE=cpu scripts/gpu-check.sh    a dry run of this script on a machine without a GPU: the
#                                      default build's binaries, tiny step shapes, TRL on the CPU
#   STAGES="fidelity synthetic real"   (default: all three)
#   BUDGET=450                         seconds for the whole run (default 450: the device tool's
#                                      8 minutes less start-up); a stage gets what is left
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-.gpu}
STAGES=${STAGES:-fidelity synthetic real}
# The dry run on a CPU (DEVICE=cpu) is many times slower than a GPU: longer limits and budget.
if [ "$DEVICE" = cuda ]; then SLOW=1; else SLOW=8; fi
BUDGET=${BUDGET:-$((450 * SLOW))}
OUT=${OUT:-$ROOT/runs/gpu-check}
mkdir -p "$OUT"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
results=$OUT/results.jsonl
: >"$results"
PY=${PYTHON:-python3}
log() { echo "== $*" >&2; }

# ---- binaries
if [ "$DEVICE" = cuda ]; then
    tar -xJf "$BUNDLE/bins.tar.xz" -C "$W" || { echo "no $BUNDLE/bins.tar.xz: run scripts/gpu-pack.sh" >&2; exit 1; }
    KTO=$W/kto-train SUITE=$W/gpu_suite STEP=$W/step
    # The CUDA libraries (cuBLAS, NVRTC, curand) from the Python wheels of the image's PyTorch,
    # and the toolkit's if installed; libcuda.so.1 is the driver's.
    libs=$("$PY" - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
except Exception:
    raise SystemExit(0)
print(":".join(os.path.join(r, s, "lib") for r in nvidia.__path__ for s in sorted(os.listdir(r))
               if os.path.isdir(os.path.join(r, s, "lib"))))
EOF
)
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && libs="${libs:+$libs:}$d"
    done
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" >&2
    SHAPES=${SHAPES:-"2 256 256,8 512 512,8 1024 1024"}
    DT=bf16
else
    cargo build --release --quiet && cp target/release/kto-train "$W/kto-train"
    STEP=$(cargo bench --bench step --no-run --message-format=json 2>/dev/null |
        grep '"kind":\["bench"\]' | grep '"name":"step"' |
        grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
    KTO=$W/kto-train SUITE=""
    SHAPES=${SHAPES:-"2 16 16"}
    DT=f32
    echo "dry run on the CPU (DEVICE=cpu): no GPU figures" >&2
fi
"$KTO" --version >&2 || { echo "kto-train does not start (libraries?)" >&2; ldd "$KTO" | grep -E 'not found|libcu' >&2; exit 1; }

# ---- TRL: the image has torch, transformers, peft, accelerate; trl and some of its needs travel.
if ! "$PY" -c 'import trl, datasets' 2>/dev/null && ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" \
        "$BUNDLE"/wheels/*.whl && export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
fi
HAVE_TRL=1
"$PY" -c 'import trl, datasets, peft' 2>/dev/null || { HAVE_TRL=0; log "no TRL here: kto-train only"; }
TRL_DEV=(--device "$DEVICE")

# ---- GPU memory: peak of memory.used while a command runs, above the level before it.
# Seconds a stage may take: its own limit, or what is left of the budget (less 15 s for the
# table); 0 when too little is left to start it.
allowed() {
    local want=$(($1 * SLOW)) left=$((BUDGET - SECONDS - 15))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$want" -lt "$left" ]; then echo "$want"; else echo "$left"; fi
}
limited() { # seconds cmd...: timeout within the budget (timeout 0 would mean no limit at all)
    local l
    l=$(allowed "$1")
    shift
    if [ "$l" = 0 ]; then
        log "skipped: the ${BUDGET} s budget is spent"
        return 124
    fi
    timeout "$l" "$@"
}
measure() { # name timeout cmd... -> runs it, prints its last JSON line with gpu_peak_gb added
    local name=$1 limit
    limit=$(allowed "$2")
    shift 2
    if [ "$limit" = 0 ]; then
        log "$name skipped: the ${BUDGET} s budget is spent"
        return
    fi
    local mem="$W/$name.mem" logf="$OUT/$name.log"
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem" 2>/dev/null &
        local watcher=$!
        sleep 0.3
    fi
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" >"$logf" 2>&1 || rc=$?
    local peak=null
    if [ "$DEVICE" = cuda ]; then
        kill "$watcher" 2>/dev/null
        wait "$watcher" 2>/dev/null
        peak=$(awk 'NR == 1 {base = $1} {if ($1 > m) m = $1} END {if (NR) printf "%.2f", (m - base) / 1024; else print "null"}' "$mem")
    fi
    local line
    line=$(grep '^{' "$logf" | tail -1)
    if [ "$rc" != 0 ] || [ -z "$line" ]; then
        log "$name failed (exit $rc after $((SECONDS - t0)) s); last lines of $logf:"
        tail -5 "$logf" >&2
        line='{}'
    fi
    "$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); r.update(name=sys.argv[2], gpu_peak_gb=json.loads(sys.argv[3]), seconds=int(sys.argv[4])); print(json.dumps(r))' \
        "$line" "$name" "$peak" "$((SECONDS - t0))" | tee -a "$results" >&2
}

# ---- 1. fidelity suite
if [[ " $STAGES " == *" fidelity "* ]]; then
    if [ -n "$SUITE" ]; then
        log "fidelity suite on $DEVICE"
        limited 150 env KTO_TRAIN_TEST_DEVICE=cuda KTO_TRAIN_REPO="$ROOT" "$SUITE" --test-threads 1 \
            >"$OUT/fidelity.log" 2>&1
        echo "fidelity exit $?" >>"$OUT/fidelity.log"
        grep -E '^test result|FAILED|panicked' "$OUT/fidelity.log" | head -20 >&2
    else
        log "fidelity suite: needs the cuda build (skipped in the dry run; cargo test runs it on the CPU)"
    fi
fi

# ---- 2. synthetic units
if [[ " $STAGES " == *" synthetic "* ]]; then
    if [ "$HAVE_TRL" = 1 ] && [ "$DEVICE" = cuda ]; then
        log "random SmolLM2-360M-shaped model for TRL"
        limited 60 "$PY" benches/trl/trl_gpu_bench.py make-model "$W/m360" --shape 360m \
            >"$OUT/make-360m.log" 2>&1
    fi
    IFS=, read -ra shapes <<<"$SHAPES"
    for s in "${shapes[@]}"; do
        read -r b p c <<<"$s"
        log "synthetic $b x ($p + $p): kto-train"
        measure "kto-synthetic-$b-$p" 45 "$STEP" --device "$DEVICE" --dtype "$DT" --batch "$b" \
            --prompt "$p" --completion "$c" --steps 3 --warmup 1 --checkpointing 1 --json
        if [ "$HAVE_TRL" = 1 ] && [ -d "$W/m360" ]; then
            log "synthetic $b x ($p + $p): TRL"
            measure "trl-synthetic-$b-$p" 60 "$PY" benches/trl/trl_gpu_bench.py "${TRL_DEV[@]}" \
                synthetic "$W/m360" --batch "$b" --prompt-len "$p" --completion-len "$c" --steps 3 --warmup 1
        fi
    done
fi

# ---- 3. real-data unit
if [[ " $STAGES " == *" real "* ]]; then
    log "random SmolLM2-135M-shaped model with the real tokenizer"
    limited 60 "$PY" benches/trl/trl_gpu_bench.py make-model "$W/m135" --shape 135m \
        --tokenizer data/samples/smollm2 >"$OUT/make-135m.log" 2>&1 ||
        { log "could not make the model (no torch?)"; tail -3 "$OUT/make-135m.log" >&2; }
    if [ -f "$W/m135/model.safetensors" ]; then
        sed -e "s|@MODEL@|$W/m135|; s|@DATA@|$ROOT/benches/trl/real-unit-64.jsonl|" \
            -e "s|@OUT@|$W/real-run|; s|@DEVICE@|$DEVICE|; s|@DTYPE@|$DT|" \
            benches/trl/real-unit-gpu.toml >"$W/real.toml"
        log "real unit: kto-train"
        measure kto-real 60 bash -c '"$1" --config "$2" --overwrite --quiet >&2 &&
            scripts/examples-per-second.py "$3/metrics.jsonl" 2 unit=real system=kto-train' \
            _ "$KTO" "$W/real.toml" "$W/real-run"
        if [ "$HAVE_TRL" = 1 ]; then
            log "real unit: TRL"
            measure trl-real 60 "$PY" benches/trl/trl_gpu_bench.py "${TRL_DEV[@]}" real "$W/m135" \
                benches/trl/real-unit-64.jsonl
        fi
    fi
fi

# ---- 4. the table
"$PY" - "$results" "$DEVICE" <<'PY' | tee "$OUT/gpu-check.md"
import json, sys
rows = {r["name"]: r for r in map(json.loads, open(sys.argv[1]))}
gpu = sys.argv[2] == "cuda"
mem = lambda r: f'{r["gpu_peak_gb"]:.2f} GB' if gpu and r.get("gpu_peak_gb") is not None else "-"
print("| unit | system | figure | vs TRL | peak GPU memory |")
print("|---|---|---|---|---|")
for name, r in rows.items():
    if not name.startswith("kto-"):
        continue
    trl = rows.get("trl-" + name[4:], {})
    if "s_per_step" in r:
        unit = f'{r["batch"]} x ({r["prompt"]} + {r["completion"]})'
        fig, ratio = f'{r["s_per_step"]:.3f} s/step', (f'{trl["s_per_step"] / r["s_per_step"]:.2f}x' if "s_per_step" in trl else "-")
        tfig = f'{trl["s_per_step"]:.3f} s/step' if "s_per_step" in trl else "failed / not run"
    elif "examples_per_s" in r:
        unit = "real-unit-64 (135M shapes)"
        fig, ratio = f'{r["examples_per_s"]:.2f} ex/s', (f'{r["examples_per_s"] / trl["examples_per_s"]:.2f}x' if "examples_per_s" in trl else "-")
        tfig = f'{trl["examples_per_s"]:.2f} ex/s' if "examples_per_s" in trl else "failed / not run"
    else:
        print(f"| {name[4:]} | kto-train | failed (see {name}.log) | - | - |")
        continue
    print(f"| {unit} | kto-train | {fig} | {ratio} | {mem(r)} |")
    print(f"| {unit} | TRL + PEFT | {tfig} | 1.00x | {mem(trl) if trl else '-'} |")
PY
