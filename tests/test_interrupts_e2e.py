"""Interruptions of the train stage under ``dvc repro``, then ``dvc repro`` again: the final
weights equal an uninterrupted run's and metrics/train holds every logged step once.

- Ctrl-C during validation: SIGINT is sent to the stage from inside its second validation
  (a ``sitecustomize`` hook the test puts on PYTHONPATH for that one run).
- ``kill -9`` of dvc and everything under it, after the first periodic checkpoint.
Either way the earlier outputs stay as they were until the run completes; and a checkpoint
left by an interrupted rerun does not block the next change of params.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from samba.config import Params
from samba.train import train

from conftest import BIN, dvc, make_pipeline_repo, relative_error, tiny_params, tool_env

pytestmark = pytest.mark.e2e

HOOK = '''
import os, signal, sys
if sys.argv and sys.argv[0].endswith("stages/train.py"):
    sys.path.insert(0, os.path.join(os.getcwd(), "src"))
    import samba.train as t
    original, calls = t.Validator.validate, []
    def validate(self):
        calls.append(1)
        if len(calls) == int(os.environ["SIGINT_AT_VALIDATION"]):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)
    t.Validator.validate = validate
'''


def params(sources: Path) -> dict:
    p = tiny_params(sources)
    p["training"].update(max_steps=60, log_every=4, eval_every=6, checkpoint_every=10)
    return p


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> tuple[Path, Path]:
    """A pipeline repository with prepare and convert done, and the train stage's uninterrupted
    result computed beside it from the same inputs."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("interrupts"), params(sources))
    dvc("repro", "prepare", "convert", cwd=repo)
    straight = tmp_path_factory.mktemp("straight")
    train(Params.from_dict(params(sources), require_all=True), repo / "data/tokenized", repo / "models/init",
          straight / "out", straight / "metrics", straight / "ckpt")
    return repo, straight


def rows(metrics_dir: Path, name: str) -> list[tuple[int, float]]:
    with open(metrics_dir / "plots/metrics" / f"{name}.tsv") as f:
        return [(int(r["step"]), float(r[name.split("/")[1]])) for r in csv.DictReader(f, delimiter="\t")]


def assert_matches_uninterrupted(repo: Path, straight: Path) -> None:
    a, b = load_file(straight / "out/model.safetensors"), load_file(repo / "models/samba/model.safetensors")
    for key in a:
        assert relative_error(b[key], a[key]) < 1e-6, key
    for name in ("train/loss", "val/ppl"):
        got, want = rows(repo / "metrics/train", name), rows(straight / "metrics", name)
        assert [s for s, _ in got] == [s for s, _ in want], f"{name}: every logged step exactly once"
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def outputs(repo: Path) -> dict[str, str]:
    """sha256 of every file under models/ and metrics/."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("models", "metrics") for p in sorted((repo / d).rglob("*")) if p.is_file()}


def sigint_at_validation(tmp_path: Path, n: int) -> dict:
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook/sitecustomize.py").write_text(HOOK)
    return tool_env(PYTHONPATH=str(tmp_path / "hook"), SIGINT_AT_VALIDATION=str(n))


def test_ctrl_c_during_validation_then_dvc_repro(reference, tmp_path):
    repo, straight = reference
    first = dvc("repro", "train", cwd=repo, env=sigint_at_validation(tmp_path, 2), check=False)
    assert first.returncode != 0
    assert "interrupted after step 12 of 60" in first.stderr  # the validation of step 12
    assert (repo / "checkpoints/train/last.pt").is_file()
    second = dvc("repro", "train", cwd=repo)
    assert "resuming from checkpoints/train/last.pt at step 12" in second.stderr + second.stdout
    assert_matches_uninterrupted(repo, straight)


def test_kill_9_then_dvc_repro(reference):
    repo, straight = reference
    # A changed stage (as after editing params.yaml), so that dvc repro must run it; the value
    # changed does not touch the trajectory, so the uninterrupted reference still holds.
    edited = yaml.safe_load((repo / "params.yaml").read_text())
    edited["logging"]["project_name"] = "samba-kill-test"
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    earlier = outputs(repo)
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=repo, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = repo / "checkpoints/train/last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert checkpoint.exists() and outputs(repo) == earlier, out[-3000:]  # the earlier run's, as they were
    again = dvc("repro", cwd=repo)  # the lock DVC held died with it
    assert "resuming from checkpoints/train/last.pt" in again.stderr + again.stdout, (again.stdout + again.stderr)[-3000:]
    assert_matches_uninterrupted(repo, straight)
    assert not checkpoint.exists()


def test_a_checkpoint_of_another_run_is_set_aside_and_the_run_starts_afresh(reference, tmp_path):
    repo, _ = reference
    dvc("repro", cwd=repo)  # complete, whatever the tests above left
    earlier = outputs(repo)
    forced = dvc("repro", "-f", "train", cwd=repo, env=sigint_at_validation(tmp_path, 2), check=False)
    assert forced.returncode != 0 and "interrupted after step 12 of 60" in forced.stderr
    checkpoint = repo / "checkpoints/train/last.pt"
    left = checkpoint.read_bytes()
    assert outputs(repo) == earlier
    assert "Stage 'train' didn't change, skipping" in dvc("repro", "train", cwd=repo).stdout
    edited = yaml.safe_load((repo / "params.yaml").read_text())
    edited["training"]["lr"] = 0.02
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    again = dvc("repro", cwd=repo)
    log = again.stdout + again.stderr
    said = re.search(r"checkpoints/train/last.pt was written by another run: params differ \(training.lr: 0.01 -> "
                     r"0.02\); set aside as (\S+); this run starts from step 0", log)
    assert said and "resuming" not in log, log[-3000:]
    assert (repo / said.group(1)).read_bytes() == left  # kept, under the name the log gives
    assert not checkpoint.exists() and outputs(repo) != earlier
    assert "up to date" in dvc("status", cwd=repo).stdout


EXIT_HOOK = '''
import atexit, os, signal, sys
if sys.argv and sys.argv[0].endswith("stages/train.py"):
    atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # as the process exits
'''


def test_a_sigterm_as_the_completed_stage_exits_keeps_the_run(reference, tmp_path):
    # a sweep's deadline sends SIGTERM to each stage process once; one that lands after the run
    # completed (its checkpoint gone) but before the process ends must not lose it
    repo, _ = reference
    edited = yaml.safe_load((repo / "params.yaml").read_text())
    edited["logging"]["project_name"] = "samba-exit-test"  # a changed stage, off the trajectory
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook/sitecustomize.py").write_text(EXIT_HOOK)
    ran = dvc("repro", "train", cwd=repo, env=tool_env(PYTHONPATH=str(tmp_path / "hook")), check=False)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    assert "Stage 'train' didn't change, skipping" in dvc("repro", "train", cwd=repo).stdout  # recorded
    assert not (repo / "checkpoints/train/last.pt").exists()
