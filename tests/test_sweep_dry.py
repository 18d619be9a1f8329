"""gpu_session.sh's sweep as the GPU machine runs it, on this CPU with a tiny model (SWEEP_DRY=1): the set-up (stand-in,
control, and twin-s0 only where the plan uses it), a worker's run through DVC with the sweep's base and the plan's
params, and what comes back. No figure means anything; the logic is what is checked. The script's own paths are
fixed (/tmp/run, /tmp/sweep, /tmp/standin, /tmp/teacher, /tmp/twin, /tmp/results): as on the GPU machine."""
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from test_sweep_plans import script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-tokenized").is_dir()
                                 or not (SHARED_DATA / "tokenizers" / "gpt-neox-20b").is_dir(),
                                 reason="the sweep's data is WikiText-2 and the GPT-NeoX tokenizer of ../shared/data")]


def checkout(tmp_path: Path) -> Path:
    """What a call carries for the sweep: the repository's files the script copies, and .gpu/data/wt2.tar.gz."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "src", "benchmarks", ".dvc"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "results", "cache", "tmp"))
    (repo / ".gpu" / "data").mkdir(parents=True)
    with tarfile.open(repo / ".gpu" / "data" / "wt2.tar.gz", "w:gz") as tar:
        for name in ("wikitext-2-tokenized", "tokenizers/gpt-neox-20b"):
            tar.add(SHARED_DATA / name, arcname=name)
    return repo


def sweep(tmp_path: Path, plan: str, deadline: int) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "plan.txt").write_text(plan)
    proc = script("sweep", tmp_path / "plan.txt", tmp_path, cwd=checkout(tmp_path), timeout=600, SWEEP_DRY="1",
                  SWEEP_JOBS="1", DEADLINE=str(deadline))
    return proc, tmp_path / "out"  # the script's log is its stdout, stderr included


def test_a_plan_without_the_twin_trains_none_and_its_run_comes_back(tmp_path):
    plan = "dense-a $KL training.epochs=2\n"
    proc, out = sweep(tmp_path, plan, deadline=550)
    log = proc.stdout
    assert proc.returncode == 0, log[-4000:]
    assert "=== no dense twin of the set-up: neither the plan nor SWEEP_PCA uses /tmp/twin" in log
    assert "=== the dense twin" not in log and not Path("/tmp/twin").exists()
    assert "dense-a: done" in log, log[-3000:]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        assert "results/runs/dense-a.eval_summary.json" in names
        params = tar.extractfile("results/runs/dense-a.params.yaml").read().decode()
        shown = json.load(tar.extractfile("results/exp_show_plan_runs.json"))
    # the plan's params over the sweep's base and the fine-tunes' base, as the worker wrote them
    for setting in ("lr: 0.0003", "distill_weight: 10.0", "teacher: /tmp/teacher", "epochs: 2",
                    "model_name: /tmp/standin", "checkpoint_every: 5", "device: cpu"):
        assert setting in params, (setting, params)
    assert "- 0.5\n  - 1.0" in params or "[0.5, 1.0]" in params, params  # dataset.train_range: the unseen half
    assert "dense-a" in json.dumps(shown) and "control-s0" not in json.dumps(shown)  # the plan's runs only


def test_a_plan_that_learns_from_the_twin_has_it_trained_first(tmp_path):
    plan = "sparse-b training.teacher=/tmp/twin training.distill_weight=10.0 $TOPK=0.9\n"
    proc, _ = sweep(tmp_path, plan, deadline=1)  # the set-up, then no run starts after the deadline
    log = proc.stdout
    assert proc.returncode == 0, log[-4000:]
    assert "=== the dense twin, seed 0 (a teacher below, or the PCA basis's model)" in log
    assert "twin: " in log and (Path("/tmp/twin") / "config.json").exists()
    assert "sparse-b: " in log and "sparse-b: done" not in log  # planned, not started: the deadline had passed
