#!/usr/bin/env bash
# One device call (see bench/README.md): install the wheels the GPU image lacks, then the GPU benchmarks.
# Run from the repo root on the GPU machine with .whl/ (shared/reference/device-wheels.sh) and
# .device/medium-articles-500.csv carried. Writes logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, peft, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"; grep -v 'it/s\]\|examples/s\]' "$OUT/$name.log" | tail -25; }
run train 300 python3 bench/bench_train.py --device cuda --steps ${TRAIN_STEPS:-30} --batch ${TRAIN_BATCH:-32} --max-length 1024 --sample .device/medium-articles-500.csv
run generate 200 python3 bench/bench_generate.py --device cuda --model gpt2-random --prompts 256 --batch-size 256 --dtype bfloat16 --results "$OUT/generate.md"
