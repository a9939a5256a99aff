#!/usr/bin/env bash
# BCO stability study: trains N seeds of the tiny smoke model for a fixed number of steps under
#   (a) Enhanced KTO, BCO off
#   (b) Enhanced KTO, BCO on
#   (c) BCO on with a staged start (bco_start_step = STEPS/4, bco_ramp_steps = STEPS/4)
#   (d) BCO on with the staged start and component clipping (component_clip = CLIP)
# and prints, per setting, the share of runs that diverged and the mean final eval loss.
# A run diverged when any step had a non-finite loss or gradient (skipped or stopped), or a
# gradient norm (before clipping) above THRESHOLD.
#
#   scripts/bco-stability.sh                      # N=10 seeds, 40 steps
#   N=4 STEPS=20 LR=5e-3 scripts/bco-stability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10}
STEPS=${STEPS:-40}
LR=${LR:-5e-3}
THRESHOLD=${THRESHOLD:-100}
CLIP=${CLIP:-1.0}
OUT=${OUT:-runs/bco-stability}
cargo build --release --quiet
BIN=target/release/kto-train
Q=$(( STEPS / 4 ))
declare -A SETTINGS=(
  [a]="--set loss.bco_shift=false"
  [b]="--set loss.bco_shift=true"
  [c]="--set loss.bco_shift=true --set loss.bco_start_step=$Q --set loss.bco_ramp_steps=$Q"
  [d]="--set loss.bco_shift=true --set loss.bco_start_step=$Q --set loss.bco_ramp_steps=$Q --set loss.component_clip=$CLIP"
)
for s in a b c d; do
  for seed in $(seq 1 "$N"); do
    dir="$OUT/$s/seed-$seed"
    mkdir -p "$OUT/$s"
    # shellcheck disable=SC2086
    "$BIN" --config configs/smoke.toml --quiet --overwrite \
      --set loss.loss_type=enhanced_kto --set train.seed="$seed" --set train.max_steps="$STEPS" \
      --set train.lr="$LR" --set train.eval_every=0 --set train.save_every=0 \
      --set train.max_consecutive_nonfinite=1000000 --set output.dir="$PWD/$dir" \
      --set "eval.benchmarks=[]" --set train.reference_cache=off \
      ${SETTINGS[$s]} >/dev/null 2>"$dir.log" || echo "exit $?" >>"$dir.log"
  done
done
python3 - "$OUT" "$N" "$THRESHOLD" <<'PY'
import json, math, sys, os
out, n, thr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
names = {"a": "Enhanced KTO, BCO off", "b": "BCO on", "c": "BCO on + staged start",
         "d": "BCO on + staged start + component clip"}
print(f"| setting | runs | diverged | share | final eval loss (mean over non-diverged) |")
print("|---|---|---|---|---|")
for s in "abcd":
    div, losses = 0, []
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
                if v.get("skipped_nonfinite", 0) > 0 or m.get("loss") is None \
                        or not math.isfinite(m["loss"]) or (g is not None and g > thr):
                    bad = True
        log = os.path.join(out, s, f"seed-{seed}.log")
        if os.path.exists(log) and "exit " in open(log).read():
            bad = True
        div += bad
        if not bad and ev is not None:
            losses.append(ev)
    mean = f"{sum(losses)/len(losses):.4f}" if losses else "-"
    print(f"| ({s}) {names[s]} | {n} | {div} | {div/n:.0%} | {mean} |")
PY
