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
# medgen's defaults on a GPU (precision auto = bf16, train.compile auto = on) next to TRL's defaults, then the
# compile lever alone (train.compile=off); batch 64 x 1024 was the fastest on an H200 (bench/RESULTS.md)
run train 270 python3 bench/bench_train.py --device cuda --steps ${TRAIN_STEPS:-30} --batch ${TRAIN_BATCH:-64} --max-length 1024 --sample .device/medium-articles-500.csv
run train-eager 150 python3 bench/bench_train.py --device cuda --only medgen --steps ${TRAIN_STEPS:-30} --batch ${TRAIN_BATCH:-64} --max-length 1024 --sample .device/medium-articles-500.csv --set train.compile=off
run generate 200 python3 bench/bench_generate.py --device cuda --model gpt2-random --prompts 256 --batch-size 256 --dtype bfloat16 --results "$OUT/generate.md"
