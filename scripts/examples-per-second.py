#!/usr/bin/env python3
"""Examples per second of a kto-train run from its metrics.jsonl: training lines only, over the
steps after the first (the first includes start-up), `BATCH` examples per step. Prints one JSON
line {"steps", "examples_per_s"} with any KEY=VALUE given added (numbers as numbers), for the
benchmark scripts (bench-vs-trl.sh, bench-ranks.sh, gpu-check.sh).

    scripts/examples-per-second.py RUN/metrics.jsonl BATCH [KEY=VALUE ...]
"""
import json
import sys


def value(v):
    try:
        return float(v)
    except ValueError:
        return v


path, batch = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(path)]
rows = [r for r in rows if not r.get("eval") and "elapsed_seconds" in r]
t = rows[-1]["elapsed_seconds"] - rows[0]["elapsed_seconds"]
out = dict(steps=len(rows), examples_per_s=round(batch * (len(rows) - 1) / t, 3))
out.update((k, value(v)) for k, v in (a.split("=", 1) for a in sys.argv[3:]))
print(json.dumps(out))
