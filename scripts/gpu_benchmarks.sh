#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one call of under 8 minutes (a lent GPU is never wasted).
#
#   bash scripts/gpu_benchmarks.sh [OUT_DIR]        # default OUT_DIR: runs/gpu
#
# Packages the GPU machine lacks travel as wheels in .whl/ (see the device tool's README): they are
# installed into /tmp/site first when that folder exists. Each benchmark has its own time limit so
# that one slow step cannot eat the others' time; a log per benchmark lands in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

run() {  # NAME SECONDS COMMAND...: one benchmark, its output to the screen and to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

run plan_check 110 python3 scripts/check_plan.py  # qdylora plan against the allocator
run train_512 80 python3 scripts/bench_train.py --seqs 512 --steps 3 --warmup 1
# train.compile and the chunked loss against the model's own: the warm-up steps are the compiling ones
run train_2048 150 python3 scripts/bench_train.py --seqs 2048 --steps 3 --warmup 2 \
  --systems qdylora,peft,qdylora+compile,qdylora+full_loss
run falcon40b 90 python3 scripts/bench_falcon40b_memory.py --steps 3
run eval_sweep 50 python3 scripts/bench_eval.py
