#!/usr/bin/env bash
# How often git misses the params.yaml that `dvc exp run -S` leaves in the workspace, and whether
# `git checkout params.yaml` then restores it, with and without a `touch` first (docs/experiments.md).
# A 3-line params.yaml with comments (DVC keeps their columns, so a same-length value leaves the
# size alone) and one stage that passes (lr <= 1) or refuses (lr > 1), in a scratch repository.
#
#   bash benchmarks/dvc_git_race.sh [RUNS]      # RUNS per case, default 16; needs dvc on PATH
set -euo pipefail
RUNS=${1:-16}
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "dvc_git_race: RUNS must be a positive whole number, got $RUNS" >&2; exit 2; }
command -v dvc > /dev/null || { echo "dvc_git_race: dvc is not on PATH (activate the venv: . .venv/bin/activate)" >&2; exit 2; }
dir=$(mktemp -d) && trap 'rm -rf "$dir"' EXIT && cd "$dir"
git init -q && git config user.email race@example.com && git config user.name race && dvc init -q
printf 'training:\n  lr: 0.1          # the rate\n  seed: 0          # the seed\n' > params.yaml
cat > dvc.yaml <<'YAML'
stages:
  check:
    cmd: python3 -c "import sys, yaml; sys.exit(2 if yaml.safe_load(open('params.yaml'))['training']['lr'] > 1 else 0)"
    params:
      - params.yaml:
YAML
dvc repro -q && git add -A && git commit -qm base
for case in passes refused; do
  hidden=0; stale_plain=0; stale_touch=0
  for i in $(seq 1 "$RUNS"); do
    [ $case = passes ] && value="0.$((i % 8 + 2))" || value="5.$((i % 8 + 2))"  # never the base's 0.1
    dvc exp run -q -S "training.lr=$value" > /dev/null 2>&1 || true
    if [ -z "$(git status --porcelain params.yaml)" ]; then
      hidden=$((hidden + 1))
      git checkout -q params.yaml
      grep -q "lr: 0.1 " params.yaml || stale_plain=$((stale_plain + 1))
      touch params.yaml && git checkout -q params.yaml
      grep -q "lr: 0.1 " params.yaml || stale_touch=$((stale_touch + 1))
    fi
    git show HEAD:params.yaml > params.yaml && git checkout -q dvc.lock 2> /dev/null || true
  done
  echo "$case: git status showed no change after $hidden of $RUNS runs; git checkout params.yaml left" \
       "the experiment's value in $stale_plain of those, touch + git checkout in $stale_touch"
done
echo "git $(git --version | cut -d' ' -f3), $(dvc --version | sed 's/^/dvc /'), $(date -u +%F)"
