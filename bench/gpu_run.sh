#!/usr/bin/env bash
# One prepared device run: install the carried wheels, run the CUDA checks, then every benchmark on CUDA.
# Usage (on the GPU machine, from the repo root): bash bench/gpu_run.sh
# Each benchmark's JSON result lands in $OUT/results/NAME-cuda.json: copy those into bench/results/ and commit
# them, then fill the README's GPU column from them.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 150 python3 bench/gpu_check.py 2>&1 | grep -v Warning | tee "$out/gpu_check.txt"
for b in mixed_vs_single server_vs_raw mixed_vs_per_task train_vs_peft; do
  timeout 90 python3 "bench/$b.py" --device cuda --results-dir "$out/results" 2>&1 | grep -v Warning | tee "$out/$b.txt"
done
