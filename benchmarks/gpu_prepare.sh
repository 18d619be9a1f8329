#!/usr/bin/env bash
# Fill .gpu/ (git-ignored): what a call to the GPU machine carries (the device tool's
# carry: [".gpu"], 64 MiB a call) for benchmarks/gpu_session.sh. Run here, once per checkout; a
# package registry is all it needs. The GPU machine has Python 3.12, torch, transformers, numpy,
# pyarrow and pytest, and no network (../shared/GPU.md):
#   .gpu/*.whl            mamba-ssm and causal-conv1d, built for it (from ../shared/wheels)
#   .gpu/dvc/*.whl        dvc and dvclive with what they need there (antlr4 is built here: no wheel)
#   .gpu/lmeval/*.whl     lm-eval and what `import samba.zeroshot` needs beyond that machine's
#                         packages (the zero-shot GPU tests score through lm-eval's model API)
#   .gpu/data/wt2.tar.gz  WikiText-2 (tokenized files) and the GPT-NeoX tokenizer
#
#   bash benchmarks/gpu_prepare.sh        # SHARED=../shared by default
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
[ -d "$SHARED/wheels" ] && [ -d "$SHARED/data" ] || { echo "gpu_prepare: $SHARED/wheels and $SHARED/data needed (SHARED=...)" >&2; exit 2; }
mkdir -p .gpu/dvc .gpu/lmeval .gpu/data
cp "$SHARED"/wheels/*.whl .gpu/

# wheels for the GPU machine's interpreter, whatever this one is
for312=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip wheel -q --no-deps -w .gpu/dvc antlr4-python3-runtime==4.9.3
python3 -m pip download -q "${for312[@]}" --find-links .gpu/dvc -d .gpu/dvc dvc==3.67.1 dvclive==3.49.1
python3 -m pip download -q "${for312[@]}" --no-deps -d .gpu/lmeval lm-eval==0.4.13 requests urllib3 certifi idna \
  chardet charset-normalizer
# what that machine has already (torch's and transformers' requirements), to keep the carry
# small; as wheel files spell them. nvidia-ml-py stays: dvclive needs it, torch does not bring it.
rm -f .gpu/dvc/{numpy,pyarrow,torch,triton,sympy,networkx,jinja2,markupsafe,fsspec,filelock,packaging,pyyaml}-*.whl

tar czf .gpu/data/wt2.tar.gz -C "$SHARED/data" wikitext-2-tokenized tokenizers/gpt-neox-20b
du -sh .gpu .gpu/* | sed 's/^/gpu_prepare: /'
total=$(du -sm .gpu | cut -f1)
[ "$total" -le 60 ] || echo "gpu_prepare: .gpu is ${total} MiB: a call carries 64 MiB in all" >&2
