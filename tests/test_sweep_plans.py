"""The sweep plans in benchmarks/sweep_plans/ hold what a GPU session will run: a bad line would
cost that run's start-up on the device and mark it FAILED, or run the wrong thing. gpu_session.sh's
`plancheck` makes each run's params the way a worker makes them (its plan expansion, set_params,
word splitting) over the sweep's base, and loads them; the sweep part runs the same check first.
Here it runs on the committed plans and on lines the device would refuse or misread."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
PLANS = sorted((ROOT / "benchmarks" / "sweep_plans").glob("*.txt"))

pytestmark = pytest.mark.slow  # starts bash and Python processes
TWIN = "the set-up trains twin-s0 (/tmp/twin)"  # plancheck's last line: does the set-up train the twin
NO_TWIN = "the set-up trains no twin-s0: nothing uses /tmp/twin"


def script(parts: str, plan: Path, tmp_path: Path, cwd: Path = ROOT, timeout: int = 120,
           **env: str) -> subprocess.CompletedProcess:
    """gpu_session.sh PARTS on SWEEP_PLAN=plan, in its own process group: on a timeout the whole group
    goes (a check that let a run through would leave DVC and a training stage running). cwd: the
    checkout the script runs in (its .gpu/ is what a call carries)."""
    (tmp_path / "out").mkdir(exist_ok=True)
    proc = subprocess.Popen(["bash", str(SCRIPT), parts], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env=tool_env(SWEEP_PLAN=str(plan), OUT=str(tmp_path / "out"), **env))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"gpu_session.sh {parts} still ran after {timeout} s:\n{out[-3000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def plancheck(plan: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return script("plancheck", plan, tmp_path, **env)


def test_the_default_plan_and_next_are_there():
    default = re.search(r"SWEEP_PLAN:-([^}]+)\}", SCRIPT.read_text()).group(1)
    assert (ROOT / default).is_file(), default
    assert {p.name for p in PLANS} >= {"twin.txt", "next.txt"}


@pytest.mark.parametrize("plan", PLANS, ids=[p.name for p in PLANS])
def test_every_run_of_a_committed_plan_loads(plan, tmp_path):
    proc = plancheck(plan, tmp_path)
    runs = [line for line in plan.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    twin = {"twin.txt": TWIN, "next.txt": NO_TWIN}[plan.name]  # twin.txt's topk90-twinteacher learns from it
    assert proc.stdout.splitlines() == [f"SWEEP_PLAN {plan}: {len(runs)} runs, each one's params load", twin]  # nothing else


@pytest.mark.parametrize("text, pca, trained", [
    ("run-a $KL\n", "0", False),
    ("run-a $KL\n# run-b training.teacher=/tmp/twin training.distill_weight=10.0\n", "0", False),  # a comment
    ("run-a $KL\n  run-b training.teacher=/tmp/twin training.distill_weight=10.0\n", "0", True),
    ("run-a training.distill_weight=10.0 training.teacher=/tmp/twin\n", "0", True),  # at the end of its line
    ("run-a $KL\n", "1", True),  # the PCA part prunes the twin
    ("run-a training.teacher=\"/tmp/twin\" training.distill_weight=10.0\n", "0", True),  # quoted, as YAML allows
    ("run-a training.teacher='/tmp/twin' training.distill_weight=10.0\n", "0", True),
    ("run-a $KL\n   # run-b training.teacher=/tmp/twin training.distill_weight=10.0\n", "0", False),  # indented comment
])
def test_the_set_up_trains_twin_s0_only_where_it_is_used(text, pca, trained, tmp_path):
    """twin-s0 costs ~85 s before any worker starts: trained where a run learns from /tmp/twin or SWEEP_PCA=1 prunes
    it. plancheck says which, from the function the set-up asks (its two branches: tests/test_sweep_dry.py)."""
    plan = tmp_path / "plan.txt"
    plan.write_text(text)
    proc = plancheck(plan, tmp_path, SWEEP_PCA=pca)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == (TWIN if trained else NO_TWIN), proc.stdout


@pytest.mark.parametrize("line, refusal", [
    ("run-b $KL training.lrr=1.0e-3", r"run-b: unknown key\(s\) training.lrr; did you mean training.lr\?"),
    ("run-b trainig.lr=1.0e-3", r"run-b: set_params .*'trainig.lr=1.0e-3' is not section.key=value"),
    ("run-b $KL $TOPKK=0.9", r"run-b: unknown key\(s\) model.sparsity_targetK"),  # a macro misspelt
    ("run-b $KL training.epochs=six", r"run-b: training.epochs: must be an integer"),
    ("run-b $KL training.epochs=6\u00a0training.seed=1", r"run-b: training.epochs: must be an integer"),  # no space
    ("run-b $KL $TOPK=0.9 training.sparsity_warmup_fraction=0.5", r"run-b: training.sparsity_warmup_fraction: is 0.5"),
    ("$KL training.epochs=6", r"'training.lr=3.0e-4': not a run name"),  # the name left out
    ("twin-s0 $KL training.epochs=6", r"twin-s0: the set-up's run of that name would be taken for it"),
    ("run-b training.teacher=/tmp/teachr training.distill_weight=10.0", r"run-b: training.teacher /tmp/teachr is none"),
    # not globbed (as in the workers, under set -f): in the repository's root param[s].yaml would be params.yaml
    ("run-b $KL training.teacher=param[s].yaml", r"run-b: training.teacher param\[s\].yaml is none"),
    ("run-b $KL training.lr=[", r"run-b: set_params run-b.yaml: 'training.lr=\[': its value is not YAML"),
    ("run-b\r $KL", r"'run-b\\r': its name ends in a carriage return"),  # a CRLF line: the workers would read the name with its \r
])
def test_a_line_the_device_would_refuse_or_misread_is_refused(line, refusal, tmp_path):
    plan = tmp_path / "plan.txt"
    # good runs beside it, before and after: a dense one from the init, one taught by the stand-in
    plan.write_bytes(f"# a comment\nrun-a $KL $TOPK=0.9 training.epochs=6\n{line}\ndense-lr6 training.lr=6.0e-4\n"
                     "from-standin training.teacher=/tmp/standin training.distill_weight=1.0\n".encode())
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"SWEEP_PLAN {plan}: 1 of its runs would fail" in proc.stdout
    assert re.search(refusal, proc.stdout), proc.stdout
    assert not re.search(r"run-a|dense-lr6|from-standin", proc.stdout)  # the good runs are not among the refused


def test_a_bad_line_is_refused_whatever_python_writes_to_stderr(tmp_path):
    """PYTHONVERBOSE fills every process's stderr: the check must not read that as a failure, nor
    let a bad run through as one it did not load."""
    plan = tmp_path / "plan.txt"
    plan.write_text("run-b $KL training.lrr=1.0e-3\nrun-a $KL\n")
    proc = plancheck(plan, tmp_path, PYTHONVERBOSE="1")
    assert proc.returncode == 1 and "1 of its runs would fail" in proc.stdout, proc.stdout[-2000:]
    assert "run-b: unknown key(s) training.lrr" in proc.stdout


def test_refusals_are_said_in_the_plans_order(tmp_path):
    """Whichever check refuses a run (set_params here, loading the params there, the name), the plan's order."""
    plan = tmp_path / "plan.txt"
    plan.write_text("run-c $KL training.lrr=1.0e-3\nrun-a $KL\nrun-b trainig.lr=1.0e-3\n$KL\nrun-d $KL training.epochs=six\n")
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1 and "4 of its runs would fail" in proc.stdout, proc.stdout
    said = [line.split(":")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert said == ["run-c", "run-b", "'training.lr=3.0e-4'", "run-d"], proc.stdout


@pytest.mark.parametrize("text, refusal", [
    ("# only a comment\n", "no runs in it"),
    ("run-a $KL\nrun-a $KL training.epochs=6\n", r"each name once \(twice: run-a \)"),
])
def test_a_plan_without_runs_or_with_a_name_twice_is_refused(text, refusal, tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text(text)
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1 and re.search(refusal, proc.stdout), proc.stdout + proc.stderr



def test_a_refused_plan_says_nothing_of_the_twin(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("run-b training.teacher=/tmp/twin training.lrr=1.0e-3\n")
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1 and "1 of its runs would fail" in proc.stdout and "the set-up trains" not in proc.stdout


def test_a_teacher_twin_the_set_up_would_not_make_is_refused(tmp_path):
    """A value the set-up's look for /tmp/twin misses but YAML reads as /tmp/twin: refused here, not a FAILED run there."""
    plan = tmp_path / "plan.txt"
    plan.write_text('run-a training.teacher="/tmp/tw\\x69n" training.distill_weight=10.0\n')
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "run-a: training.teacher /tmp/twin is none of the set-up's models (/tmp/standin /tmp/teacher)" in proc.stdout


def test_plan_show_states_the_recipe_each_run_trains_with(tmp_path):
    """The figures in benchmarks/results/sparsity/ name the recipe (docs/sparsity.md): the sweep's base
    (fine-tunes from the stand-in on the train split's second half), $KL (lr 3e-4, KL 10 from the control)
    and $TOPK (Hoyer 0.5 beside top-k). The check makes each run's params from the same arrays the sweep
    uses (SWEEP_BASE, FINETUNE_BASE, $KL, $TOPK), so a change to a value there shows here; the sweep's
    own use of them (the set-up, the workers) is checked by a CPU dry sweep: tests/test_sweep_dry.py.
    A line without $KL trains with the base alone: the control's recipe, the teacher of every $KL run."""
    plan = tmp_path / "plan.txt"
    plan.write_text("base\ntwin $KL\ntopk90-6ep $KL $TOPK=0.9 training.epochs=6\n")
    proc = plancheck(plan, tmp_path, PLAN_SHOW="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *show, twin = proc.stdout.splitlines()[1:]
    assert twin == NO_TWIN
    shown = dict(line.split(" ", 1) for line in show)
    base = {'dataset.name="/tmp/wt2/wikitext-2-tokenized"', 'dataset.tokenizer="/tmp/wt2/tokenizers/gpt-neox-20b"',
            "dataset.train_range=[0.5,1.0]", 'pretrained.model_name="/tmp/standin"', "training.eval_every=150",
            "training.checkpoint_every=150", 'compute.device="cuda:0"', "eval.prune_fractions=[0.0]"}
    kl = {"training.lr=0.0003", "training.distill_weight=10.0", 'training.teacher="/tmp/teacher"'}
    assert set(shown) == {"base", "twin", "topk90-6ep"}
    assert set(shown["base"].split()) == base  # lr 1e-4, 3 epochs, no teacher: params.yaml's, so not listed
    assert set(shown["twin"].split()) == base | kl
    assert set(shown["topk90-6ep"].split()) == base | kl | {"model.sparsity_target=0.9", "training.pruning_weight=0.5",
                                                             "training.epochs=6"}


def test_the_sweep_refuses_a_bad_plan_before_it_starts_anything(tmp_path):
    """The sweep part runs the same check first: a bad line stops the call before the GPU tests start
    beside the set-up (testsbg) and before the set-up (here a CPU dry run, SWEEP_DRY=1), not as a
    FAILED run after the stand-in has trained, nor with the set-up's models deleted."""
    plan = tmp_path / "plan.txt"
    plan.write_text("run-a $KL\nrun-b $KL training.lrr=1.0e-3\n")
    proc = script("testsbg,sweep", plan, tmp_path, SWEEP_DRY="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 of its runs would fail" in proc.stdout and "run-b: unknown key(s) training.lrr" in proc.stdout
    log = (tmp_path / "out" / "session.log").read_text()
    assert "1 of its runs would fail" in log, log
    assert "=== GPU tests" not in log and "=== set-up" not in log and "stand-in" not in log.lower(), log


def test_a_plan_file_that_is_not_there_is_refused_by_name(tmp_path):
    proc = plancheck(tmp_path / "nxt.txt", tmp_path)
    assert proc.returncode == 1 and f"SWEEP_PLAN {tmp_path / 'nxt.txt'}: no such file" in proc.stdout, proc.stdout + proc.stderr
    assert "No such file or directory" not in proc.stdout + proc.stderr  # grep's, before the script's own word


def test_one_run_is_counted_as_one(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("run-a $KL\n")
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 0 and "1 run, each one's params load" in proc.stdout, proc.stdout + proc.stderr



def test_a_set_up_name_with_a_bad_line_is_refused_for_its_line(tmp_path):
    plan = tmp_path / "plan.txt"
    plan.write_text("run-a $KL\ntwin-s0 trainig.lr=1.0e-3\n")
    proc = plancheck(plan, tmp_path)
    assert proc.returncode == 1 and re.search(r"twin-s0: set_params .*'trainig.lr=1.0e-3' is not section.key=value",
                                              proc.stdout), proc.stdout
