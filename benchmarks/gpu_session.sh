#!/usr/bin/env bash
# Everything this project runs on the GPU machine, in one call (device time is scarce):
#   1. install the kernels (and dvc/dvclive, absent there) from wheels carried in .gpu/
#   2. the GPU tests: kernel path vs reference path          -> $OUT/gpu_tests.log
#   3. the training-step benchmark                           -> $OUT/train_step.{md,json}, bench.log
#   4. the real pipeline with dvc, WikiText-2 from .gpu/data -> $OUT/run.log, run.tar.gz
# Usage there: bash benchmarks/gpu_session.sh [tests,bench,run]
# Carry: .gpu (mamba_ssm and causal_conv1d wheels, .gpu/dvc/*.whl, .gpu/data/wt2.tar.gz).
set -uo pipefail
PARTS=${1:-tests,bench,run}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$REPO/src
if [[ $PARTS == *run* ]]; then
  python3 -m pip install -q --no-index --find-links .gpu/dvc dvc==3.67.1 dvclive==3.49.1 2>&1 | grep -v WARNING | tail -3
fi
python3 -c "import torch, mamba_ssm, causal_conv1d; print('torch', torch.__version__, 'mamba_ssm', mamba_ssm.__version__)"

if [[ $PARTS == *tests* ]]; then
  echo "=== GPU tests"; start=$SECONDS
  python3 -m pytest -p no:cacheprovider -m gpu -v -s tests/test_kernels_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "rel err|PASS|FAIL|Error|passed|failed" | tail -60
  echo "GPU tests: $((SECONDS - start)) s"
fi

if [[ $PARTS == *bench* ]]; then
  echo "=== benchmark"; start=$SECONDS
  python3 benchmarks/train_step.py ${BENCH_ARGS:-} --out "$OUT/train_step.md" --json "$OUT/train_step.json" > "$OUT/bench.log" 2>&1
  tail -45 "$OUT/bench.log"
  echo "benchmark: $((SECONDS - start)) s"
fi

if [[ $PARTS == *run* ]]; then
  echo "=== pipeline run"; start=$SECONDS
  mkdir -p /tmp/wt2 /tmp/bin && tar xzf .gpu/data/wt2.tar.gz -C /tmp/wt2
  command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
  export PATH=/tmp/bin:$PATH
  rm -rf /tmp/run && mkdir /tmp/run
  cp -r dvc.yaml params.yaml stages src .dvc .dvcignore .gitignore pyproject.toml /tmp/run/
  rm -rf /tmp/run/.dvc/tmp /tmp/run/.dvc/cache
  export PYTHONPATH=/tmp/site:/tmp/run/src
  cd /tmp/run && git init -q && git config user.email gpu@example.com && git config user.name gpu \
    && git add -A && git commit -qm pipeline || exit 1
  ( time python3 -m dvc exp run -n gpu-wt2 ${RUN_ARGS:-} \
      -S dataset.name=/tmp/wt2/wikitext-2-tokenized -S dataset.tokenizer=/tmp/wt2/tokenizers/gpt-neox-20b \
      -S pretrained.use_pretrained=false -S training.epochs=1 -S training.lr=6.0e-4 \
      -S training.eval_every=100 -S compute.compile=true ) > "$OUT/run.log" 2>&1
  echo "dvc exp run exit $?"; grep -vE "^\s*$|it/s|step/s|batch/s" "$OUT/run.log" | tail -25
  echo "--- evaluate stage alone"
  ( time python3 stages/evaluate.py --out /tmp/eval_again.json --plots /tmp/plots_again ) >> "$OUT/run.log" 2>&1
  grep -A3 "^real" "$OUT/run.log" | tail -8
  tar czf "$OUT/run.tar.gz" dvc.lock params.yaml metrics
  cat metrics/eval.json | head -30
  echo "pipeline: $((SECONDS - start)) s"
  cd "$REPO"
fi
