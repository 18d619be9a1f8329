#!/usr/bin/env bash
# Fill .gpu/ (git-ignored): what a call to the GPU machine carries (the device tool's
# carry: [".gpu"], 64 MiB a call) for benchmarks/gpu_session.sh. Run here, once per checkout; a
# package registry is all it needs. The GPU machine has Python 3.12, torch, transformers, numpy,
# pyarrow and pytest, and no network (../shared/GPU.md):
#   .gpu/*.whl            mamba-ssm and causal-conv1d, built for it (from ../shared/wheels)
#   .gpu/dvc/*.whl        dvc and dvclive with what they need there and the machine has not (antlr4 is built
#                         here: no wheel; what it has: benchmarks/gpu_machine_packages.txt)
#   .gpu/lmeval/*.whl     lm-eval (the zero-shot GPU tests score through lm-eval's model API; what else
#                         `import samba.zeroshot` needs, the machine has)
#   .gpu/data/wt2.tar.gz  WikiText-2 (tokenized files) and the GPT-NeoX tokenizer
#
#   bash benchmarks/gpu_prepare.sh        # SHARED=../shared by default
#   GPU_PYTHON=/path/python3.12 bash benchmarks/gpu_prepare.sh   # the Python 3.12 pip checks the carry on (found by
#                                         # itself on PATH or under pyenv; GPU_PYTHON= skips the check)
#   LMEVAL=0 bash benchmarks/gpu_prepare.sh   # without lm-eval (9 MiB): for calls that run neither the GPU tests
#                                         # nor zeroshot, when the repository has grown and the carry would not fit
# A call carries the repository's files (tracked and untracked-not-ignored) and .gpu/: 64 MiB in all.
# The last line says how much of that this checkout takes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
[ -d "$SHARED/wheels" ] && [ -d "$SHARED/data" ] || { echo "gpu_prepare: $SHARED/wheels and $SHARED/data needed (SHARED=...)" >&2; exit 2; }
# A Python 3.12, like the machine's, for pip's check of the carry below: GPU_PYTHON, else the first python3.12 that
# runs (a pyenv shim may not); GPU_PYTHON= skips the check
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
if [ -z "${GPU_PYTHON+set}" ]; then
  GPU_PYTHON= unchecked="no Python 3.12 found here (GPU_PYTHON=...)"
  for py in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    is312 "$py" && { GPU_PYTHON=$py; break; }
  done
elif [ -z "$GPU_PYTHON" ]; then
  unchecked="skipped (GPU_PYTHON=)"
else
  is312 "$GPU_PYTHON" || { echo "gpu_prepare: GPU_PYTHON=$GPU_PYTHON does not run as a Python 3.12 (the GPU machine's)" >&2; exit 2; }
fi
mkdir -p .gpu/dvc .gpu/lmeval .gpu/data
cp "$SHARED"/wheels/*.whl .gpu/

# wheels for the GPU machine's interpreter, whatever this one is
for312=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip wheel -q --no-deps -w .gpu/dvc antlr4-python3-runtime==4.9.3
dvc_pins=($(grep -oE '^dvc(live)?==[^ ]+' requirements.txt || true))  # the versions requirements.txt pins
[ ${#dvc_pins[@]} = 2 ] || { echo "gpu_prepare: requirements.txt must pin dvc==... and dvclive==..., once each; found: ${dvc_pins[*]:-none}" >&2; exit 2; }
python3 -m pip download -q "${for312[@]}" --find-links .gpu/dvc -d .gpu/dvc "${dvc_pins[@]}"
if [ "${LMEVAL:-1}" = 1 ]; then  # installed without its requirements: the machine has what samba.zeroshot uses
  python3 -m pip download -q "${for312[@]}" --no-deps -d .gpu/lmeval lm-eval==0.4.13
else
  rm -rf .gpu/lmeval
fi
# what that machine has already, in versions dvc's and dvclive's wheels accept, stays here (10 MiB of 29 in .gpu/dvc):
# benchmarks/gpu_machine_packages.txt, a session's pip list
# and, on GPU_PYTHON, pip itself installs dvc and dvclive from what is left beside that list (a dry run): a carry
# that would not install there fails here, not in a call
if [ -n "$GPU_PYTHON" ]; then
  python3 benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc --check "$GPU_PYTHON" \
    $(printf -- '--require %s ' "${dvc_pins[@]}") | tail -2
else
  python3 benchmarks/gpu_slim.py benchmarks/gpu_machine_packages.txt .gpu/dvc | tail -1
  echo "gpu_prepare: pip's install of .gpu/dvc on the machine's packages not checked: $unchecked"
fi

tar czf .gpu/data/wt2.tar.gz -C "$SHARED/data" wikitext-2-tokenized tokenizers/gpt-neox-20b
{ du -sh .gpu/*; du -sh .gpu; } | sed 's/^/gpu_prepare: /'
# a tracked file deleted in the working tree is not carried (cat fails on it: not the end of the check)
repo=$( { git ls-files -z -co --exclude-standard | xargs -0 cat 2>/dev/null || true; } | wc -c)
gpu=$(find .gpu -type f -print0 | xargs -0 cat | wc -c)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "gpu_prepare: a call carries $(mib $((repo + gpu))) MiB of 64 (the repository's files $(mib $repo) MiB, .gpu $(mib $gpu) MiB)"
if [ $((repo + gpu)) -gt $((63 * 1048576)) ]; then  # a MiB kept free: the device tool counts a little beside the files
  echo "gpu_prepare: too large for a call; LMEVAL=0 leaves lm-eval out (then run neither tests, testsbg nor zeroshot)" >&2
  exit 1
fi
