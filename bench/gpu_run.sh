#!/usr/bin/env bash
# One prepared device run: install the carried wheels, then run the CUDA checks (`check`) and the named benchmarks
# on CUDA, each under its own time limit.
# Usage (on the GPU machine, from the repo root): REVISION=<commit> bash bench/gpu_run.sh check mixed_vs_single ...
# Carried: `.whl/` (the wheels the machine's image lacks) and `.gpu/` (wrk and its libluajit, for the HTTP benches).
# A device copy of a checkout is not the project's git history, so each result gets the commit it ran on from
# REVISION (send a clean tree).
# Everything printed goes to $OUT/log.txt; the JSON results come back in $OUT/results.tar, as NAME-cuda.json:
# unpack them into bench/results/, commit them, and fill the README's GPU column from them.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench PYTHONUNBUFFERED=1 PATH=$PWD/.gpu:$PATH LD_LIBRARY_PATH=$PWD/.gpu
out=${OUT:-/tmp/out}
mkdir -p "$out/results"

run_all() {
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

declare -A LIMIT=([check]=150 [mixed_vs_single]=60 [mixed_vs_per_task]=60 [decode_vs_generate]=60 [train_vs_peft]=60
  [server_vs_raw]=110 [continuous_vs_static]=110)
declare -A ARGS=([train_vs_peft]="--repeats 10" [server_vs_raw]="--repeats 3 --warm-s 3 --seconds 5"
  [continuous_vs_static]="--repeats 2")
for named in "$@"; do  # NAME, or NAME:SECONDS for another limit
  name=${named%%:*}
  [ "$named" != "$name" ] && LIMIT[$name]=${named#*:}
  echo "== $name ($(date +%T), limit ${LIMIT[$name]:-90} s)"
  if [ "$name" = check ]; then
    timeout "${LIMIT[$name]}" python3 bench/gpu_check.py
  else
    # shellcheck disable=SC2086
    timeout "${LIMIT[$name]:-90}" python3 "bench/$name.py" --device cuda --results-dir "$out/results" ${ARGS[$name]:-}
  fi
  echo "== $name exit $?"
done
}
run_all "$@" 2>&1 | grep --line-buffered -v Warning | tee -a "$out/log.txt"
python3 - "$out/results" "${REVISION:-}" <<'PY'
import json, sys
from pathlib import Path
for path in Path(sys.argv[1]).glob("*.json"):
    result = json.loads(path.read_text())
    if sys.argv[2]:  # the copy's own .git, if any, is not the project's history
        path.write_text(json.dumps({**result, "revision": sys.argv[2], "dirty": False}) + "\n")
PY
tar -C "$out/results" -cf "$out/results.tar" . && rm -r "$out/results"
