#!/usr/bin/env bash
# BCO stability study: trains N seeds for a fixed number of steps under
#   (a) Enhanced KTO, BCO off
#   (b) Enhanced KTO, BCO on
#   (c) BCO on with a staged start (bco_start_step = STEPS/4, bco_ramp_steps = STEPS/4)
#   (d) BCO on with the staged start and component clipping (component_clip = CLIP)
# (value function, TK92 weighting and the odds-ratio term on in every setting) and prints, per
# setting, the share of runs that diverged and the mean final eval loss.
# A run diverged when any step had a non-finite loss or gradient (skipped or stopped), or a
# gradient norm (before clipping) above THRESHOLD.
#
#   scripts/bco-stability.sh                                   # tiny smoke model, N=10, 40 steps
#   N=4 STEPS=20 LR=5e-3 scripts/bco-stability.sh
#   CONFIG=configs/real-smollm2.toml SETTINGS="b c d" N=5 STEPS=20 LR=2e-4 \
#     EXTRA="--set train.grad_accum=1 --set train.max_length=128" scripts/bco-stability.sh
#                                                              # the real SmolLM2 (fetched first)
# Environment: CONFIG, SETTINGS, N, STEPS, LR, THRESHOLD, CLIP, OUT, EXTRA (more --set options),
# KTO_TRAIN_BIN (default target/release/kto-train, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/smoke.toml}
SETTINGS=${SETTINGS:-a b c d}
N=${N:-10}
STEPS=${STEPS:-40}
LR=${LR:-5e-3}
THRESHOLD=${THRESHOLD:-100}
CLIP=${CLIP:-1.0}
OUT=${OUT:-runs/bco-stability}
# Absolute, so that output.dir does not resolve against the config's folder.
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
EXTRA=${EXTRA:-}
BIN=${KTO_TRAIN_BIN:-target/release/kto-train}
[ -x "$BIN" ] || cargo build --release --quiet
MODEL=()
if grep -q "real-model" "$CONFIG"; then
  MODEL=(--set "model.name_or_path=$(scripts/fetch-real-model.sh)")
fi
Q=$(( STEPS / 4 ))
declare -A FLAGS=(
  [a]="--set loss.bco_shift=false"
  [b]="--set loss.bco_shift=true"
  [c]="--set loss.bco_shift=true --set loss.bco_start_step=$Q --set loss.bco_ramp_steps=$Q"
  [d]="--set loss.bco_shift=true --set loss.bco_start_step=$Q --set loss.bco_ramp_steps=$Q --set loss.component_clip=$CLIP"
)
for s in $SETTINGS; do
  for seed in $(seq 1 "$N"); do
    dir="$OUT/$s/seed-$seed"
    mkdir -p "$OUT/$s"
    # shellcheck disable=SC2086
    "$BIN" --config "$CONFIG" --quiet --overwrite "${MODEL[@]}" \
      --set loss.loss_type=enhanced_kto --set loss.value_function=true --set loss.weighting=tk92 \
      --set loss.odds_ratio_weight=0.1 --set train.seed="$seed" --set train.max_steps="$STEPS" \
      --set train.lr="$LR" --set train.eval_every=0 --set train.eval_on_start=false \
      --set train.save_every=0 --set train.max_consecutive_nonfinite=1000000 \
      --set output.dir="$dir" --set "eval.benchmarks=[]" --set train.reference_cache=auto \
      $EXTRA ${FLAGS[$s]} >/dev/null 2>"$dir.log" || echo "exit $?" >>"$dir.log"
  done
done
python3 - "$OUT" "$N" "$THRESHOLD" "$SETTINGS" <<'PY'
import json, math, sys, os
out, n, thr, settings = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split()
names = {"a": "Enhanced KTO, BCO off", "b": "BCO on", "c": "BCO on + staged start",
         "d": "BCO on + staged start + component clip"}
print("| setting | runs | diverged | share | largest grad norm | final eval loss (mean over non-diverged) |")
print("|---|---|---|---|---|---|")
for s in settings:
    div, losses, gmax = 0, [], 0.0
    for seed in range(1, n + 1):
        path = os.path.join(out, s, f"seed-{seed}", "metrics.jsonl")
        bad, ev = True, None
        if os.path.exists(path):
            bad = False
            for line in open(path):
                v = json.loads(line)
                m = v.get("metrics", {})
                if v.get("eval"):
                    ev = m.get("eval_loss")
                    continue
                g = m.get("grad_norm")
                if g is not None and math.isfinite(g):
                    gmax = max(gmax, g)
                if v.get("skipped_nonfinite", 0) > 0 or m.get("loss") is None \
                        or not math.isfinite(m["loss"]) or (g is not None and g > thr):
                    bad = True
        log = os.path.join(out, s, f"seed-{seed}.log")
        if os.path.exists(log) and "exit " in open(log).read():
            bad = True
        div += bad
        if not bad and ev is not None and math.isfinite(ev):
            losses.append(ev)
    mean = f"{sum(losses)/len(losses):.4f}" if losses else "-"
    print(f"| ({s}) {names[s]} | {n} | {div} | {div/n:.0%} | {gmax:.3g} | {mean} |")
PY
