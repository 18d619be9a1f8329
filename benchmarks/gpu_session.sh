#!/usr/bin/env bash
# Everything this project runs on the GPU machine (device time is scarce: few, full calls).
#   bash benchmarks/gpu_session.sh tests,bench,gen     # one H200: kernel tests, step and decoding benchmarks
#   DEADLINE=500 bash benchmarks/gpu_session.sh testsbg,sweep   # the GPU tests beside the sweep's set-up, then its runs
#   DEADLINE=500 bash benchmarks/gpu_session.sh collect # each later call, made within 30 s of the last: the runs go on
#   bash benchmarks/gpu_session.sh sweep               # the fresh-data protocol: stand-in on half the train split, the sweep on the other half
#   SWEEP_PLAN=benchmarks/sweep_plans/next.txt bash benchmarks/gpu_session.sh plancheck
#                                                      # any machine, no GPU: each run's params made as a worker makes them, loaded
#                                                      # (PLAN_SHOW=1: and each run's changes from params.yaml printed)
#   bash benchmarks/gpu_session.sh evaltime            # the evaluate stage's wall time and where it goes (+ evaluate_passes.py)
#   bash benchmarks/gpu_session.sh bench,stage         # the train stage itself against the benchmark's a, one call
#   bash benchmarks/gpu_session.sh scaling             # data-parallel scaling of the train stage (2+ GPUs)
#   ZS_MODELS="standin=/tmp/standin sparse=DIR" COMMIT=abc1234 bash benchmarks/gpu_session.sh zeroshot
#                                                      # lm-eval: wikitext + offline zero-shot tasks of those models, speed vs HFLM
# Knobs: DEADLINE (seconds into the call to stop the sweep's runs, resumably, and pack; default 450;
# up to GRACE=30 s for the stop and 60 s for the table follow it, so at most 500 in a 600-s call),
# SWEEP_PLAN (the runs: benchmarks/sweep_plans/twin.txt, or next.txt), SWEEP_JOBS (runs at once, default 4),
# SWEEP_PCA=1 (training-free PCA pruning of control and twin too),
# SWEEP_DRY=1 (sweep and collect on this CPU with a tiny model: checks the logic, no number means anything).
# Carry .gpu: the mamba-ssm / causal-conv1d wheels (../shared/wheels), liger-kernel and
# cut-cross-entropy wheels, .gpu/dvc/*.whl (dvc, dvclive and what they need), .gpu/data/wt2.tar.gz
# (WikiText-2 tokenized + the GPT-NeoX tokenizer); for zeroshot, .gpu/lmeval/*.whl (lm-eval alone: the machine has what else it needs)
# and .gpu/zeroshot/ (benchmarks/zeroshot_data.py). Results: $RES, packed into $OUT/results.tar.gz
# after every part, so that a call cut short still brings back what finished.
set -uo pipefail
PARTS=${1:-tests,bench,gen}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/results; mkdir -p $RES
REPO=$(pwd)
DEADLINE=${DEADLINE:-450}   # seconds: stop waiting on the sweep and pack what is done (a call ends at 600)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Progress bars redrawn at most every 10 s (tqdm reads TQDM_* defaults): the logs come back into the repository,
# and a 6-epoch run's log was ~90 kB of redrawn bars; a call carries the repository too (64 MiB with .gpu/).
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}
# The machine's site-packages hold no bytecode, and its environment sets PYTHONDONTWRITEBYTECODE,
# so every process compiled ~2,000 modules (torch._dynamo, sympy, transformers) from source:
# 6-14 s of each stage's start-up (results/2026-11-29/evaluate_stage_no_bytecode.log). A normal install has its
# bytecode; here it is written to /tmp once and read by every later process.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
exec > >(tee -a "$OUT/session.log") 2>&1  # the log comes back even if the call is cut short
pack() { tar czf /tmp/results.tar.gz.part -C /tmp results && mv /tmp/results.tar.gz.part "$OUT/results.tar.gz"; }
CPU_ONLY=0; { [ "${SWEEP_DRY:-0}" = 1 ] || [ "$PARTS" = plancheck ]; } && CPU_ONLY=1
if [ $CPU_ONLY != 1 ] && [[ ,$PARTS, == *,tests,* || ,$PARTS, == *,testsbg,* || $PARTS == *zeroshot* ]] \
   && ! ls .gpu/lmeval/*.whl > /dev/null 2>&1; then  # else the zero-shot tests fail on the import, late
  echo "gpu_session: $PARTS needs lm-eval, and .gpu/lmeval/ has no wheels: bash benchmarks/gpu_prepare.sh without LMEVAL=0"
  exit 2
fi
if [ $CPU_ONLY != 1 ]; then  # SWEEP_DRY=1 (sweep only) or plancheck: a CPU, in this repo's venv; no GPU, no kernels
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  [ -d /tmp/site/mamba_ssm ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$REPO/src
if [ "$PARTS" != plancheck ]; then  # a wrapper: a symlinked venv python loses its venv
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
fi
[ $CPU_ONLY = 1 ] || python3 -c "import torch, mamba_ssm, causal_conv1d; print('torch', torch.__version__, 'mamba_ssm', mamba_ssm.__version__, 'GPUs', torch.cuda.device_count())"
# what the machine's Python has, with versions (~1 s): which of .gpu/'s wheels it does not need (a call carries
# 64 MiB, the repository included), read from a session's results rather than guessed
[ $CPU_ONLY = 1 ] || [ -e $RES/pip_list.txt ] || python3 -m pip list --format=freeze > $RES/pip_list.txt 2>/dev/null

install_dvc() {  # once per machine: a second pip run over the same environment broke its PyYAML once
  python3 -c "import yaml, dvc, dvclive" 2>/dev/null && return 0
  local pins; pins=$(grep -oE '^dvc(live)?==[^ ]+' "$REPO/requirements.txt")
  [ "$(echo "$pins" | wc -l)" = 2 ] || { echo "requirements.txt must pin dvc==... and dvclive==..., once each; found: ${pins:-none}"; exit 1; }
  python3 -m pip install -q --no-index --find-links "$REPO/.gpu/dvc" $pins 2>&1 | grep -v WARNING | tail -3
  python3 -c "import yaml, dvc, dvclive" || { echo "dvc / dvclive / yaml do not import"; exit 1; }
}
set_params() {  # set_params FILE section.key=value ...: edit a params file, each value read as YAML
  python3 - "$@" <<'EOF'
import sys, yaml
path, *pairs = sys.argv[1:]
p = yaml.safe_load(open(path))
for pair in pairs:
    try:
        key, value = pair.split("=", 1)
        section, name = key.split(".")
        p[section][name] = yaml.safe_load(value)
    except yaml.YAMLError as err:  # one line each: plan_check and the worker's log quote it
        sys.exit(f"set_params {path}: {pair!r}: its value is not YAML ({' '.join(str(err).split())})")
    except (ValueError, KeyError) as err:
        sys.exit(f"set_params {path}: {pair!r} is not section.key=value of a section there ({type(err).__name__}: {err})")
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
EOF
}
WT2=(dataset.name=/tmp/wt2/wikitext-2-tokenized dataset.tokenizer=/tmp/wt2/tokenizers/gpt-neox-20b pretrained.use_pretrained=false)
wt2_params() {  # wt2_params FILE [section.key=value ...]: WikiText-2 and the GPT-NeoX tokenizer from .gpu/data, random init
  mkdir -p /tmp/wt2 && tar xzf "$REPO/.gpu/data/wt2.tar.gz" -C /tmp/wt2 && set_params "$1" "${WT2[@]}" "${@:2}"
}
wt2_project() {  # wt2_project DIR LOG [section.key=value ...]: DIR/params.yaml (wt2_params), DIR/tok, DIR/init
  mkdir -p "$1" && cp params.yaml "$1/params.yaml" && wt2_params "$1/params.yaml" "${@:3}" \
    && python3 stages/prepare.py --params "$1/params.yaml" --out "$1/tok" > "$2" 2>&1 \
    && python3 stages/convert.py --params "$1/params.yaml" --out "$1/init" >> "$2" 2>&1 \
    || { tail -5 "$2"; pack; exit 1; }
}
# The sweep (issue 22). Its base over params.yaml (WT2 first), then the fine-tunes' base (the unseen
# half, from the stand-in); the set-up's models; the recipe that plans spell $KL and $TOPK: lr 3e-4,
# KL 10 from the control; sparse: top-k + Hoyer 0.5.
SWEEP_BASE=(training.warmup_steps=30 training.eval_every=150 training.checkpoint_every=150 "eval.prune_fractions=[0.0]")
FINETUNE_BASE=(pretrained.use_pretrained=true pretrained.model_name=/tmp/standin "dataset.train_range=[0.5,1.0]"
  training.epochs=3 training.lr=1.0e-4 training.sparsity_warmup_steps=100)
SWEEP_MODELS=(/tmp/standin /tmp/teacher /tmp/twin)  # the stand-in, the control (every plan's teacher), twin-s0 (where used)
KL="training.lr=3.0e-4 training.teacher=/tmp/teacher training.distill_weight=10.0"
TOPK="training.pruning_weight=0.5 model.sparsity_target"
plan_file() { local p=${SWEEP_PLAN:-benchmarks/sweep_plans/twin.txt}; [[ $p == /* ]] || p=$REPO/$p; echo "$p"; }
expand_plan() {  # expand_plan PLAN OUT: its runs, one a line, $KL and $TOPK spelled out; refused: no run, a name twice
  [ -f "$1" ] || { echo "SWEEP_PLAN $1: no such file"; return 1; }
  grep -vE '^\s*(#|$)' "$1" | sed "s|\$KL|$KL|g; s|\$TOPK|$TOPK|g" > "$2" && [ -s "$2" ] \
    || { echo "SWEEP_PLAN $1: no runs in it"; return 1; }
  local dup; dup=$(awk '{print $1}' "$2" | sort | uniq -d | tr '\n' ' ')
  [ -z "$dup" ] || { echo "SWEEP_PLAN $1: each name once (twice: $dup)"; return 1; }
}
twin_needed() {  # does the set-up train twin-s0: a run of the plan learns from it, or SWEEP_PCA=1 prunes it
  [ "${SWEEP_PCA:-0}" = 1 ] || grep -vE '^\s*#' "$(plan_file)" | grep -qE "=[\"']?/tmp/twin\b"
}
run_args() { awk -v n="$1" '$1 == n { $1 = ""; print }' "$2"; }  # run_args NAME PLAN: the run's section.key=value pairs
plan_check() {  # each run of SWEEP_PLAN made into its params as a worker makes them, then loaded; names and teachers
  local d plan name; d=$(mktemp -d) && mkdir "$d/runs" && plan=$(plan_file) || return 1  # runs/: any name, base too
  if ! { expand_plan "$plan" "$d/plan.txt" && cp "$REPO/params.yaml" "$d/base.yaml" \
      && set_params "$d/base.yaml" "${WT2[@]}" "${SWEEP_BASE[@]}" && set_params "$d/base.yaml" "${FINETUNE_BASE[@]}"; }; then
    rm -rf "$d"; return 1
  fi
  set -f  # as in the worker: a value such as [0.0,0.5] is a YAML list, not a glob
  while read -r name _; do  # the names as the workers read them
    echo "$name" >> "$d/names"
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || continue  # not a run name (a line without its name?): refused below
    cp "$d/base.yaml" "$d/runs/$name.yaml" && set_params "$d/runs/$name.yaml" compute.device=cuda:0 $(run_args "$name" "$d/plan.txt") \
      2> "$d/runs/$name.err" || { echo "$name: $(tail -1 "$d/runs/$name.err" | sed "s|$d/runs/||g")" >> "$d/refused"; touch "$d/runs/$name.bad"; }
  done < "$d/plan.txt"
  set +f
  local made="${SWEEP_MODELS[*]}" twin=1; twin_needed || { twin=0; made=${made/ \/tmp\/twin/}; }  # what the set-up will make
  REPO=$REPO PYTHONPATH=$REPO/src python3 - "$d" "$plan" "$made" \
    $(grep -oE 'exp run -n [A-Za-z0-9_.-]+' "$REPO/benchmarks/gpu_session.sh" | awk '{print $4}') <<'EOF'
import json, os, re, sys
from pathlib import Path
from samba.config import ConfigError, load_params
d, plan, made, setup = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), set(sys.argv[4:])
bad = {}  # name: set_params's refusal, said in the plan's order below
for line in (d / "refused").read_text().splitlines() if (d / "refused").exists() else []:
    bad[line.split(": ", 1)[0]] = line
refused = []
names = open(d / "names", newline="").read().split("\n")[:-1]  # as bash read them: a CRLF line's name ends in \r
for name in names:
    if name.endswith("\r"):
        refused.append(f"{name!r}: its name ends in a carriage return (Windows line ends? save the plan with LF)")
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        refused.append(f"{name!r}: not a run name (a line without its name?)")
    elif name in bad:
        refused.append(bad[name])
    elif name in setup:
        refused.append(f"{name}: the set-up's run of that name would be taken for it (pick another name)")
    elif not (d / "runs" / f"{name}.bad").exists():
        try:
            teacher = load_params(d / "runs" / f"{name}.yaml").training.teacher
        except ConfigError as err:
            refused.append(f"{name}: {err}")
            continue
        if teacher not in {*made, "models/init"}:
            refused.append(f"{name}: training.teacher {teacher} is none of the set-up's models ({' '.join(made)})")
if refused:
    sys.exit(f"SWEEP_PLAN {plan}: {len(refused)} of its runs would fail\n  " + "\n  ".join(refused))
print(f"SWEEP_PLAN {plan}: {len(names)} run{'s' if len(names) > 1 else ''}, each one's params load")
if os.environ.get("PLAN_SHOW") == "1":  # what each run changes from the repository's params.yaml, as it will run
    import yaml
    from samba.config import flatten
    repo = flatten(yaml.safe_load(open(os.environ["REPO"] + "/params.yaml")))
    for name in names:
        run = flatten(yaml.safe_load(open(d / "runs" / f"{name}.yaml")))
        print(name, " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in run.items() if repo.get(k, object()) != v))
EOF
  local rc=$?; rm -rf "$d"
  [ $rc = 0 ] && { [ $twin = 1 ] && echo "the set-up trains twin-s0 (/tmp/twin)" || echo "the set-up trains no twin-s0: nothing uses /tmp/twin"; }
  return $rc
}
if [ "$PARTS" = plancheck ]; then plan_check; exit; fi  # on its own: nothing else runs, nothing is packed
if [[ $PARTS == *sweep* ]]; then  # first, before the GPU tests start beside the set-up: a bad plan line would be a FAILED run
  install_dvc; plan_check || { pack; exit 1; }
fi

# The sweep's fine-tunes run in the call, never beyond it: J workers, each in its own clone of
# /tmp/run (one DVC cache), take the plan's runs in order; at DEADLINE each run in flight is asked
# to stop (SIGTERM: the train stage saves its checkpoint at the next step) and a later call made
# within 30 s (`collect`) resumes it from there, in the same clone. (2026-12-07: the DVC queue's
# workers ended with the call that started them, and 16 queued runs were lost.)
SW=/tmp/sweep
# A run that fails is marked FAILED and not tried again (its log: $RES/runs/NAME.log).
worker() {  # worker K: its own unfinished run first (resumed), then the next unclaimed one of the plan
  local k=$1 name args
  set -f  # a value such as [0.0,0.5] is a YAML list, not a glob
  cd "$SW/w$k" || return 1
  while [ ! -e $SW/stop ]; do
    name=$(awk -v k="$k" -v c=$SW/claims '{ d = c "/" $1; if (system("test -e " d "/done -o -e " d "/failed") == 0) next;
      w = ""; if ((getline w < (d "/worker")) > 0 && w == k) { print $1; exit } }' $SW/plan.txt)
    if [ -z "$name" ]; then
      while read -r n _; do mkdir "$SW/claims/$n" 2>/dev/null && { echo "$k" > "$SW/claims/$n/worker"; name=$n; break; }; done < $SW/plan.txt
    fi
    [ -n "$name" ] || return 0
    if git for-each-ref --format='%(refname)' refs/exps | grep -q "/$name\$"; then  # finished, cut before marked
      touch "$SW/claims/$name/done"; continue
    fi
    args=$(run_args "$name" $SW/plan.txt)
    # params.yaml written whole from the clone's commit (never left to git, which can miss a
    # same-size rewrite: docs/experiments.md), then touched
    git show HEAD:params.yaml > params.yaml && set_params params.yaml compute.device=cuda:$((k % NGPU)) $args \
      && touch params.yaml || { touch "$SW/claims/$name/failed"; continue; }
    [ "${SWEEP_DRY:-0}" = 1 ] && set_params params.yaml compute.device=cpu
    [ -e $SW/stop ] || [ $SECONDS -ge $DEADLINE ] && return 0  # no run starts after the deadline
    echo "$(date +%T) +$SECONDS s w$k: $name"
    if python3 -m dvc exp run -n "$name" >> "$RES/runs/$name.log" 2>&1; then
      touch "$SW/claims/$name/done"; echo "$(date +%T) +$SECONDS s w$k: $name done"
      for f in params.yaml metrics/eval.json metrics/eval_summary.json metrics/train/summary.json; do
        cp "$f" "$RES/runs/$name.$(basename "${f%.*}" | sed 's/^summary$/train_summary/').${f##*.}"; done
      show "$SW/w$k" 120
    elif [ -e $SW/stop ]; then
      return 0  # the deadline: the next call resumes it from its checkpoint
    else
      touch "$SW/claims/$name/failed"; echo "$(date +%T) w$k: $name FAILED"; tail -5 "$RES/runs/$name.log"
    fi
  done
}
show() {  # show DIR SECONDS: DIR's dvc exp show --json into $SW/show_<dir>.json (the last one kept if it fails)
  local out=$SW/show_$(basename "$1").json
  (cd "$1" && timeout "$2" python3 -m dvc exp show --json > "$out.part" 2> "$out.err") && mv "$out.part" "$out" \
    || echo "dvc exp show in $1 failed or took over $2 s: $(tail -1 "$out.err" 2>/dev/null); its last table stands"
}
sweep_stages() {  # the PIDs of the stages' Python processes run in the sweep's clones (not the shell DVC runs each in)
  local pid
  for pid in $(pgrep -f '^[^ ]*python[0-9.]* stages/(check|prepare|convert|train|evaluate)[.]py --params params[.]yaml'); do
    [[ $(readlink /proc/$pid/cwd 2>/dev/null) == $SW/w* ]] && echo $pid
  done
}
any_alive() {  # any_alive PID...: whether one of these processes still runs
  local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1
}
work() {  # the plan's workers until they finish it or DEADLINE; then stop them resumably, tabulate, pack
  [ -f $SW/plan.txt ] || { echo "no sweep to go on with ($SW/plan.txt): run the sweep part first"; return 1; }
  export PYTHONPATH=/tmp/site  # each clone's stages import their own src (stages/_repo.py)
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
  rm -f $SW/stop; mkdir -p "$RES/runs"
  local pids=() k pid sent=" "
  for k in $(seq 0 $(($(cat $SW/jobs) - 1))); do worker "$k" & pids+=($!); done  # the sweep's number, whatever SWEEP_JOBS says now
  while [ $SECONDS -lt $DEADLINE ]; do
    any_alive "${pids[@]}" || break; sleep 5
  done
  touch $SW/stop
  local left; left=$(for pid in $(sweep_stages); do basename "$(readlink /proc/$pid/cwd)"; done | sort -u | tr '\n' ' ')
  [ -z "$left" ] || echo "$(date +%T) +$SECONDS s: the deadline; stopping the runs of $left(resumed by a later collect)"
  # One SIGTERM to each stage process, as it appears, for up to GRACE s: the train stage finishes
  # its step and saves it; the shell DVC runs it in must not get one (it would die at once, DVC
  # with it, and the stage be killed unsaved below). Then whatever is left is killed.
  for i in $(seq ${GRACE:-30}); do
    for pid in $(sweep_stages); do [[ $sent == *" $pid "* ]] || { kill -TERM $pid 2>/dev/null; sent+="$pid "; }; done
    any_alive "${pids[@]}" || break; sleep 1
  done
  for pid in $(sweep_stages); do kill -KILL $pid 2>/dev/null; done
  for pid in "${pids[@]}"; do pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; done  # a worker's dvc exp show
  wait "${pids[@]}" 2> /dev/null
  tabulate
}
tabulate() {  # the frontier of every finished run (each clone's exp show), what is left
  local d shows=(); for d in $SW/w*; do show "$d" 30 & shows+=($!); done
  wait "${shows[@]}"  # these only: a bare wait would wait on the log's tee too, which ends only with the script
  python3 -c "import json, sys; print(json.dumps([e for f in sys.argv[1:] for e in json.load(open(f))]))" \
    $SW/show_*.json > "$RES/exp_show.json" && PYTHONPATH=/tmp/site:$REPO/src timeout 30 python3 -m samba.frontier \
    "$RES/sparsity" --from-json "$RES/exp_show.json" 2>&1 | tail -40
  # the plan's runs only, without the set-up's (each session retrains control-s0, and twin-s0 where used): what joins
  # another session's sweep (python -m samba.frontier OUT --from-json A/exp_show.json --from-json B/exp_show_plan_runs.json)
  python3 - "$RES/exp_show.json" $SW/plan.txt > "$RES/exp_show_plan_runs.json" <<'EOF'
import json, sys
shown, plan = json.load(open(sys.argv[1])), {l.split()[0] for l in open(sys.argv[2]) if l.strip()}
for commit in shown:
    commit["experiments"] = [e for e in commit.get("experiments") or [] if any(r.get("name") in plan for r in e.get("revs") or [])]
print(json.dumps(shown))
EOF
  while read -r n _; do c=$SW/claims/$n
    if [ -e $c/done ]; then s=done; elif [ -e $c/failed ]; then s=FAILED; elif [ -d $c ]; then s="started (w$(cat $c/worker 2>/dev/null))"; else s=waiting; fi
    echo "$n: $s"; done < $SW/plan.txt | tee "$RES/plan_status.txt"
  cp $SW/plan.txt "$RES/plan.txt"; pack
}

install_lmeval() {  # the zero-shot GPU tests and zeroshot need lm-eval (2026-12-07 ran without it: two tests failed on the import)
  python3 -c "import lm_eval" 2>/dev/null || ! ls .gpu/lmeval/*.whl > /dev/null 2>&1 || python3 -m pip install -q \
    --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/lmeval/*.whl 2>&1 | grep -v WARNING | tail -3
}
gpu_tests() {
  local start=$SECONDS
  install_dvc  # the graphed-training tests run the train stage, which logs with dvclive
  install_lmeval
  python3 -m pytest -p no:cacheprovider -m gpu -v -s tests/test_kernels_gpu.py > "$RES/gpu_tests.log" 2>&1
  grep -E "rel err|bound|PASS|FAIL|Error|passed|failed" "$RES/gpu_tests.log" | tail -75
  echo "GPU tests: $((SECONDS - start)) s"
}
if [[ ,$PARTS, == *,tests,* ]]; then
  echo "=== GPU tests"; gpu_tests; pack
fi

if [[ $PARTS == *bench* ]]; then
  echo "=== training-step benchmark"; start=$SECONDS
  python3 benchmarks/train_step.py --rounds 2 --steps 8 --only "${BENCH_ONLY:-c,c_graphed,a_eager,a,a_topk,a_nocompile,a_noreadout,a_distill}" \
    --out "$RES/train_step.md" --json "$RES/train_step.json" \
    > "$RES/bench.log" 2>&1
  grep -E "^---|ready|failed|round" "$RES/bench.log" | tail -30; sed -n '/^## Batch/,/^## Profile/p' "$RES/train_step.md" | head -60
  echo "benchmark: $((SECONDS - start)) s"; pack
fi

if [[ $PARTS == *stage* ]]; then  # after bench: the train stage itself against this call's benchmark a
  echo "=== the train stage against the benchmark's step a"; start=$SECONDS
  install_dvc  # the benchmark's step (train_step.py's TRAINING):
  wt2_project /tmp/st "$RES/stage.log" training.pruning_penalty=l1 training.pruning_weight=0.05 training.readout_weight=0.5
  python3 benchmarks/scaling.py --params /tmp/st/params.yaml --data /tmp/st/tok --init /tmp/st/init --steps 60 \
    --timeout 240 --bench-json "$RES/train_step.json" --out "$RES/stage_vs_benchmark.md" \
    --json "$RES/stage_vs_benchmark.json" >> "$RES/stage.log" 2>&1
  tail -8 "$RES/stage_vs_benchmark.md"; echo "stage: $((SECONDS - start)) s"; pack
fi

if [[ $PARTS == *gen* ]]; then
  echo "=== decoding benchmark"; start=$SECONDS
  python3 benchmarks/generate.py --profile --out "$RES/generate.md" --json "$RES/generate.json" > "$RES/generate.log" 2>&1
  sed -n '/^| batch/,/^## samba, /p' "$RES/generate.md"; grep -E "^## " "$RES/generate.md"; grep -iE "error|Traceback" "$RES/generate.log" | head -5
  echo "decoding: $((SECONDS - start)) s"; pack
fi

if [[ $PARTS == *scaling* ]]; then
  echo "=== scaling"; start=$SECONDS
  wt2_project /tmp/sc "$RES/scaling.log"
  python3 benchmarks/scaling.py --params /tmp/sc/params.yaml --data /tmp/sc/tok --init /tmp/sc/init --steps 60 \
    --timeout 150 --out "$RES/scaling.md" --json "$RES/scaling.json" >> "$RES/scaling.log" 2>&1
  tail -8 "$RES/scaling.md"; echo "scaling: $((SECONDS - start)) s"; pack
fi

TESTS_PID=
if [[ ,$PARTS, == *,testsbg,* ]]; then  # after the timed parts: the GPU tests beside the sweep's set-up
  echo "=== GPU tests, in the background"; install_dvc; install_lmeval  # before the sweep imports from /tmp/site
  gpu_tests > "$RES/gpu_tests_summary.txt" 2>&1 &
  TESTS_PID=$!
fi

if [[ $PARTS == *sweep* ]]; then  # issue 22: every sparse model against its dense twin, budgets 3 to 12 epochs
  # (benchmarks/results/sparsity/README.md). SWEEP_DRY=1: the same on a CPU with a tiny model (checks the logic).
  echo "=== set-up"; start=$SECONDS
  install_dvc; NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "${SWEEP_DRY:-0}" = 1 ] && NGPU=1
  RUN=/tmp/run; rm -rf $RUN "${SWEEP_MODELS[@]}" && mkdir $RUN
  cp -r dvc.yaml params.yaml stages src .dvcignore .gitignore pyproject.toml $RUN/ && mkdir $RUN/.dvc \
    && cp -r .dvc/config .dvc/plots $RUN/.dvc/
  export PYTHONPATH=/tmp/site:$RUN/src OMP_NUM_THREADS=4
  cd $RUN && git init -q && git config user.email gpu@example.com && git config user.name gpu || exit 1
  # WikiText-2 (wikitext-2-v1 files: the raw train split is not at hand) and the GPT-NeoX tokenizer
  wt2_params params.yaml "${SWEEP_BASE[@]}" || exit 1
  if [ "${SWEEP_DRY:-0}" = 1 ]; then  # a tiny model, a few steps: every command runs, no number means anything
    set_params params.yaml model.d_model=32 model.n_layers=4 model.readout_stride=2 model.readout_hidden_dim=32 \
      training.batch_size=4 training.seq_len=32 training.max_steps=40 training.eval_every=20 training.eval_batches=2 \
      training.warmup_steps=2 training.checkpoint_every=5 eval.max_windows=8 compute.device=cpu || exit 1
  fi
  git add -A && git commit -qm "sweep base" && python3 -m dvc repro prepare convert > "$RES/setup.log" 2>&1 \
    || { tail -20 "$RES/setup.log"; pack; exit 1; }
  git add -A && git commit -qm "prepare, convert (random init)" -q
  echo "set-up: $((SECONDS - start)) s"

  echo "=== stand-in: the first half of the train split, 4 epochs at lr 6e-4 from random init"; start=$SECONDS
  python3 -m dvc exp run -n standin -S "dataset.train_range=[0.0,0.5]" -S training.epochs=4 -S training.lr=6.0e-4 \
    -S training.warmup_steps=100 -S training.readout_weight=0.0 -S training.pruning_weight=0.0 \
    -S training.eval_every=300 > "$RES/standin.log" 2>&1 || { tail -30 "$RES/standin.log"; pack; exit 1; }
  cp -r models/samba /tmp/standin && mkdir -p "$RES/standin" && cp metrics/eval.json "$RES/standin/eval.json" \
    && cp -r metrics/train/metrics.json metrics/train/plots "$RES/standin/"
  grep -vE "it/s|step/s|batch/s|^\s*$" "$RES/standin.log" | tail -3; echo "stand-in: $((SECONDS - start)) s"; pack

  echo "=== the fine-tunes' base: the unseen second half, from the stand-in"; start=$SECONDS
  # the stand-in's metrics go: committed with the fine-tunes' params they would read as a run of them
  git checkout -q -- params.yaml dvc.lock && rm -rf metrics || exit 1
  set_params params.yaml "${FINETUNE_BASE[@]}" || exit 1
  python3 -m dvc repro prepare convert > "$RES/convert_standin.log" 2>&1 || { tail -20 "$RES/convert_standin.log"; pack; exit 1; }
  git add -A && git commit -qm "sweep: the unseen half, from the stand-in" -q
  echo "=== the teacher: the dense control (lr 1e-4, 3 epochs, seed 0)"
  python3 -m dvc exp run -n control-s0 > "$RES/teacher.log" 2>&1 || { tail -30 "$RES/teacher.log"; pack; exit 1; }
  cp -r models/samba /tmp/teacher && git checkout -q -- params.yaml dvc.lock && python3 -m dvc checkout -q
  grep -vE "it/s|step/s|batch/s|^\s*$" "$RES/teacher.log" | tail -2; echo "teacher: $((SECONDS - start)) s"; pack

  # twin-s0 only where something uses it: a plan run's teacher, or the PCA part (~85 s before any worker starts,
  # about one 6-epoch run of four workers' time; its recipe's seeds are in the sweeps already)
  if twin_needed; then
    kl=$(printf -- '-S %s ' $KL)  # the recipe with sparsity off
    echo "=== the dense twin, seed 0 (a teacher below, or the PCA basis's model)"; start=$SECONDS
    python3 -m dvc exp run -n twin-s0 $kl > "$RES/twin.log" 2>&1 || { tail -30 "$RES/twin.log"; pack; exit 1; }
    cp -r models/samba /tmp/twin && git checkout -q -- params.yaml dvc.lock && python3 -m dvc checkout -q
    grep -vE "it/s|step/s|batch/s|^\s*$" "$RES/twin.log" | tail -2; echo "twin: $((SECONDS - start)) s"; pack
  else
    echo "=== no dense twin of the set-up: neither the plan nor SWEEP_PCA uses /tmp/twin"
  fi

  echo "=== the fine-tunes: $SW/plan.txt, ${SWEEP_JOBS:-4} workers, each in a clone of $RUN"; start=$SECONDS
  rm -rf $SW "$RES/runs" "$RES/sparsity" && mkdir -p $SW/claims "$RES/runs" || exit 1  # nothing of an earlier sweep
  show $RUN 120  # control-s0 (and twin-s0)
  echo "${SWEEP_JOBS:-4}" > $SW/jobs
  for k in $(seq 0 $((${SWEEP_JOBS:-4} - 1))); do
    git clone -q $RUN $SW/w$k && (cd $SW/w$k && python3 -m dvc cache dir --local $RUN/.dvc/cache \
      && python3 -m dvc checkout -q prepare convert) || { echo "clone $k failed"; pack; exit 1; }
  done
  expand_plan "$(plan_file)" $SW/plan.txt || { pack; exit 1; }  # SWEEP_PLAN (default benchmarks/sweep_plans/twin.txt)
  echo "$(wc -l < $SW/plan.txt) runs planned, clones ready: $((SECONDS - start)) s"
  if [ "${SWEEP_PCA:-0}" = 1 ]; then  # measured 2026-12-07 (results/2026-12-07/pca_control_twin.json)
    echo "=== training-free pruning in the PCA basis: the control and the twin (beside the fine-tunes)"
    cp params.yaml /tmp/pca_params.yaml && set_params /tmp/pca_params.yaml "eval.prune_basis=[native,pca]" \
      "eval.prune_fractions=[0.0,0.25,0.5,0.75,0.9,0.95]"
    ( python3 stages/evaluate.py --params /tmp/pca_params.yaml --data data/tokenized --baseline /tmp/teacher \
        --model /tmp/twin --out "$RES/pca_control_twin.json" --summary /tmp/pca_summary.json --plots "$RES/pca_plots" \
        > "$RES/pca.log" 2>&1; echo "pca: exit $?" >> "$RES/pca.log" ) &
  fi
  work
  echo "sweep: $((SECONDS - start)) s"
  cd "$REPO"
fi

if [[ $PARTS == *evaltime* ]]; then  # the evaluate stage's wall time, start-up included, and where it goes
  echo "=== evaluate stage timing (WikiText-2 test, random-init model as both models)"; start=$SECONDS
  wt2_project /tmp/et "$RES/evaltime.log"
  grep -n "TRITON_CACHE_AUTOTUNING" "$(python3 -c 'import triton, os; print(os.path.dirname(triton.__file__))')/knobs.py" | head -2
  ( time python3 -c "import torch; torch.zeros(1, device='cuda')" ) 2>&1 | grep real | sed 's/^/torch + CUDA context: /' | tee -a "$RES/evaltime.log"
  ( time python3 -c "import samba.cli, samba.evaluate" ) 2>&1 | grep real | sed 's/^/imports: /' | tee -a "$RES/evaltime.log"
  python3 -X importtime -c "import samba.cli, samba.evaluate" 2> "$RES/importtime.txt"  # per module, microseconds
  python3 - "$RES/importtime.txt" <<'EOF2' | tee -a "$RES/evaltime.log"
import sys
rows = [l.split("|") for l in open(sys.argv[1]) if l.startswith("import time:") and "cumulative" not in l]
rows = [(int(c), int(a.split(":")[1]), n.rstrip()) for a, c, n in rows]
print("import profile: top modules by cumulative time (s; self time in brackets)")
for cum, own, name in sorted(rows, reverse=True)[:30]:
    print(f"  {cum / 1e6:6.2f} ({own / 1e6:5.2f}) {name}")
EOF2
  evaluate() { python3 "$@" stages/evaluate.py --params /tmp/et/params.yaml --data /tmp/et/tok --baseline /tmp/et/init \
      --model /tmp/et/init --out /tmp/et/eval.json --plots /tmp/et/plots; }
  for i in 1 2; do  # the second run finds Triton's kernel cache warm, as a run after training does
    ( time evaluate ) >> "$RES/evaltime.log" 2>&1
    tr '\r' '\n' < "$RES/evaltime.log" | grep -E "^real|loaded in|written in" | tail -4
  done
  # a third run, traced: who imports the heavy modules and when; is bytecode cached
  ( time evaluate benchmarks/trace_imports.py ) > "$RES/evaluate_imports.log" 2>&1
  ( time evaluate benchmarks/trace_imports.py --import mamba_ssm ) >> "$RES/evaluate_imports.log" 2>&1  # as before e386ca2
  tr '\r' '\n' < "$RES/evaluate_imports.log" | grep -E "trace_imports|^real|loaded in|written in"; du -sh /tmp/pycache
  python3 benchmarks/evaluate_passes.py --out "$RES/evaluate_passes.md" --json "$RES/evaluate_passes.json" \
    > "$RES/evaluate_passes.log" 2>&1; sed -n '/^| pass/,/^## main/p' "$RES/evaluate_passes.md"; tail -3 "$RES/evaluate_passes.log"
  echo "evaluate timing: $((SECONDS - start)) s"; pack
fi

if [[ $PARTS == *zeroshot* ]]; then  # after sweep: its stand-in and sparse runs, named in ZS_MODELS (NAME=DIR ...)
  echo "=== zero-shot: lm-evaluation-harness on ${ZS_MODELS:-no models (speed only)}"; start=$SECONDS
  cd "$REPO"; export PYTHONPATH=/tmp/site:$REPO/src
  install_lmeval
  python3 -c "import lm_eval, datasets, pyarrow, fsspec; from importlib.metadata import version as v; \
print(*(f'{n} {v(n)}' for n in ('lm_eval', 'datasets', 'pyarrow', 'fsspec', 'huggingface_hub')))" || { pack; exit 1; }
  (cd .gpu/zeroshot && sha256sum --check --quiet SHA256SUMS) || { echo ".gpu/zeroshot: files missing or changed"; pack; exit 1; }
  left=$((DEADLINE + 120 - SECONDS)); [ $left -lt 60 ] && left=60  # the script writes its report after each part
  timeout $left python3 benchmarks/zeroshot.py --models ${ZS_MODELS:-} --parts "${ZS_PARTS:-eval,speed}" \
    --commit "${COMMIT:-unknown}" --res "$RES" \
    --out "$RES/zeroshot.md" --json "$RES/zeroshot.json" > "$RES/zeroshot.log" 2>&1
  echo "exit $?"; grep -E "^(eval|speed) " "$RES/zeroshot.log"; grep -iE "error|Traceback" "$RES/zeroshot.log" | head -5
  sed -n '/^## Results/,$p' "$RES/zeroshot.md" | head -60
  echo "zero-shot: $((SECONDS - start)) s"; pack
fi

if [[ $PARTS == *collect* ]]; then  # a call within 30 s of the last: the plan's runs go on (resumed), tabulated
  echo "=== the sweep's fine-tunes, continued"; work || exit 1
fi
if [ -n "$TESTS_PID" ]; then wait $TESTS_PID; echo "=== GPU tests (background)"; cat "$RES/gpu_tests_summary.txt"; fi
pack; ls -la "$OUT"
