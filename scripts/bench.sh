#!/usr/bin/env bash
# One optimizer step at SmolLM2-360M's shapes (benches/step.rs: random weights, exact config,
# batch 2, LoRA alpha = 2r on all seven projections, KTO with KL pairs), for several sequence
# lengths and ranks, per GEMM path: candle's GEMM, the default build's f32 (gemmkit) and bf16
# (AVX-512 BF16 kernel), and oneDNN/MKL through the fast-gemm feature. Prints one JSON line per run and a table: median s/step, policy tokens/s, peak RSS,
# executed FLOPs per step and achieved GFLOP/s.
#
#   scripts/bench.sh                    # the full grid (takes a long while on 2 cores)
#   scripts/bench.sh --quick            # only the work unit: 256+256 tokens, rank 16
#   scripts/bench.sh --configs "256:256:16 512:512:16" --backends "candle bf16" --steps 3 --warmup 1
#
# Backends: candle, f32, bf16 = the default build with KTO_TRAIN_GEMM=candle|f32|bf16 (f32 and
# bf16 need nothing installed); lib-f32, lib-bf16 = built with --features fast-gemm and
# KTO_TRAIN_GEMM_ENGINE=library (needs oneDNN or MKL: python3 -m pip install onednn==2026.1.0,
# or KTO_TRAIN_BLAS=/path/to/libdnnl.so.3); a library backend whose library is missing is
# reported as such and skipped. The machine drifts: compare only rows of one run.
#
# FLOPs per step, counted from the shapes (what the step executes; multiply-add = 2 FLOPs):
#   B = 2 sequences, T = prompt + completion, S = B * completion (rows whose logits are taken),
#   K = completion + 1 (tokens a KL pass computes: it reuses the example's prompt states),
#   d = 960, L = 32, V = 49152,
#   P_lin  = L * (d*d [q] + 2*d*320 [k,v] + d*d [o] + 3*d*2560 [gate, up, down]) = 314.6M
#   P_lora = L * r * sum over the 7 projections of (in + out)                  = 8.7M at r 16
#   F(lora) = 2*B*T*(P_lin + lora*P_lora)      linear layers
#           + 4*B*T^2*d*L                       attention q@k^T and P@v (full T x T, as computed)
#           + 2*S*d*V                           tied lm_head at the scored rows only
#   KL(lora) = 2*B*K*(P_lin + lora*P_lora) + 4*B*K*T*d*L + 2*S*d*V
#   backward (policy only, activation gradients; no frozen-weight gradients):
#   Bwd     = 2*B*T*P_lin + 4*B*T*P_lora + 8*B*T^2*d*L + 2*S*d*V
#   step    = F(0) + KL(0) [reference] + F(1) + KL(1) [policy] + Bwd
#             + F(1) - 2*S*d*V with activation checkpointing (blocks recomputed in the backward)
# (The issue's "irreducible" work leaves out the reference passes and the recomputation.)
#
# --checkpointing 0|1 (default 1, as configs/*.toml) sets activation checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=3
warmup=1
configs="256:256:16 512:512:16 1024:1024:16 256:256:8 256:256:64"
backends="candle f32 bf16 lib-bf16"
ckpt=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) configs="256:256:16"; shift ;;
        --configs) configs="$2"; shift 2 ;;
        --backends) backends="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --checkpointing) ckpt="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

work="${TMPDIR:-/tmp}/kto-train-bench.$$"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# Build each variant once and keep its executable, so that switching features does not
# rebuild between runs.
build() { # $1 = name, rest = cargo flags
    local name="$1"; shift
    local exe
    # The step benchmark's own artifact line (the kto-train binary may be listed too).
    exe=$(cargo bench --bench step --no-run --message-format=json "$@" 2>"$work/build-$name.log" \
        | grep '"kind":\["bench"\]' | grep '"name":"step"' \
        | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4) || true
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        cat "$work/build-$name.log" >&2
        echo "build of the $name variant failed" >&2
        exit 1
    fi
    cp "$exe" "$work/step-$name"
}
case " $backends " in *" candle "*|*" f32 "*|*" bf16 "*) build default ;; esac
case " $backends " in *" lib-"*) build lib --features fast-gemm ;; esac

results="$work/results.jsonl"
: >"$results"
echo "uptime: $(uptime)" >&2
for cfg in $configs; do
    IFS=: read -r prompt completion rank <<<"$cfg"
    for be in $backends; do
        case "$be" in
            lib-*) exe="$work/step-lib"; mode="${be#lib-}"; engine=library ;;
            *) exe="$work/step-default"; mode="$be"; engine=gemmkit ;;
        esac
        log="$work/run.log"
        echo "== $prompt+$completion r$rank $be" >&2
        if ! KTO_TRAIN_GEMM="$mode" KTO_TRAIN_GEMM_ENGINE="$engine" KTO_TRAIN_GEMM_VERBOSE=1 "$exe" --json --steps "$steps" \
            --warmup "$warmup" --prompt "$prompt" --completion "$completion" --rank "$rank" \
            --checkpointing "$ckpt" >"$work/out.json" 2>"$log"; then
            # Keep going: a configuration can run out of memory (at 1024+1024 tokens the step
            # needed more than this machine's 24 GB when this script was written).
            tail -5 "$log" >&2
            echo "run failed: $prompt+$completion r$rank $be" | tee -a "$work/failed" >&2
            continue
        fi
        cat "$log" >&2
        if [ "$engine" = library ] && grep -q "no oneDNN or MKL library was found" "$log"; then
            echo "skipping $be: no oneDNN or MKL library" >&2
            continue
        fi
        lib=$(sed -n 's/^kto-train: matrix products: //p' "$log" | head -1)
        line=$(tail -1 "$work/out.json")
        echo "$line" | awk -v be="$be" -v lib="${lib:-candle}" -v up="$(cut -d, -f3- /proc/loadavg 2>/dev/null || true)" '
        {
            s = $0
            match(s, /"s_per_step":[0-9.eE+-]+/); sps = substr(s, RSTART + 13, RLENGTH - 13)
            match(s, /"peak_rss_mb":[0-9.eE+-]+/); rss = substr(s, RSTART + 14, RLENGTH - 14)
            match(s, /"prompt":[0-9]+/); p = substr(s, RSTART + 9, RLENGTH - 9)
            match(s, /"completion":[0-9]+/); c = substr(s, RSTART + 13, RLENGTH - 13)
            match(s, /"rank":[0-9]+/); r = substr(s, RSTART + 7, RLENGTH - 7)
            ck = (s ~ /"checkpointing":true/) ? 1 : 0
            B = 2; T = p + c; S = B * c; K = c + 1; d = 960; L = 32; V = 49152; ff = 2560; kv = 320
            plin = L * (d*d + 2*d*kv + d*d + 3*d*ff)
            plora = L * r * ((d+d) + 2*(d+kv) + (d+d) + 3*(d+ff))
            att = 4*B*T*T*d*L; head = 2*S*d*V
            f0 = 2*B*T*plin + att + head
            f1 = 2*B*T*(plin + plora) + att + head
            kl0 = 2*B*K*plin + 4*B*K*T*d*L + head
            kl1 = 2*B*K*(plin + plora) + 4*B*K*T*d*L + head
            bwd = 2*B*T*plin + 4*B*T*plora + 2*att + head
            flops = f0 + kl0 + f1 + kl1 + bwd + ck * (f1 - head)
            sub(/}$/, "", s)
            printf "%s,\"backend\":\"%s\",\"library\":\"%s\",\"tflop_per_step\":%.4f,\"irreducible_tflop\":%.4f,\"gflops\":%.1f}\n",
                s, be, lib, flops / 1e12, (f1 + kl1 + bwd) / 1e12, flops / sps / 1e9
        }' | tee -a "$results"
    done
done

echo
echo "| tokens/step | rank | backend | checkpointing | s/step (median) | policy tokens/s | peak RSS | TFLOP/step | achieved GFLOP/s |"
echo "|---|---|---|---|---|---|---|---|---|"
awk '
function num(k,   m) { if (match($0, "\"" k "\":[0-9.eE+-]+")) return substr($0, RSTART + length(k) + 3, RLENGTH - length(k) - 3); return "" }
function str(k) { if (match($0, "\"" k "\":\"[^\"]*\"")) return substr($0, RSTART + length(k) + 4, RLENGTH - length(k) - 5); return "" }
{
    ck = ($0 ~ /"checkpointing":true/) ? "on" : "off"
    printf "| %d (%d+%d) x 2 | %d | %s | %s | %.2f | %.0f | %.2f GB | %.2f | %.0f |\n",
        2 * (num("prompt") + num("completion")), num("prompt"), num("completion"), num("rank"),
        str("backend"), ck, num("s_per_step"), num("tokens_per_s"), num("peak_rss_mb") / 1024,
        num("tflop_per_step"), num("gflops")
}' "$results"
if [ -s "$work/failed" ]; then
    echo
    cat "$work/failed"
    exit 1
fi
