"""Refused runs under DVC, which deletes a stage's outputs before running it unless they are
``persist``: after a complete ``dvc repro``, a ``dvc exp run`` that a stage refuses exits with
its one line and leaves models/, metrics/ and data/ byte for byte as they were; a good run
then still works, and DVC's cache still restores the outputs (``dvc checkout``, ``--temp``
workspaces, ``dvc exp apply``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import dvc, make_pipeline_repo, sh, tiny_params

pytestmark = pytest.mark.e2e


def outputs(repo: Path, dirs=("models", "metrics", "data")) -> dict[str, str]:
    """sha256 of every file under ``dirs``."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted((repo / d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo(sources, tmp_path_factory) -> Path:
    repo = make_pipeline_repo(tmp_path_factory.mktemp("refusals"), tiny_params(sources))
    dvc("repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "a complete run", cwd=repo)
    return repo


def _refused(repo, override):
    before = outputs(repo)
    assert {"models/samba/model.safetensors", "metrics/train/metrics.json", "metrics/eval.json",
            "data/tokenized/train.bin"} <= set(before)
    committed = sh("git", "show", "HEAD:params.yaml", cwd=repo).stdout
    proc = dvc("exp", "run", "-S", override, cwd=repo, check=False)
    assert proc.returncode != 0
    restore(repo, "params.yaml")  # a failed exp run leaves its -S in params.yaml
    assert (repo / "params.yaml").read_text() == committed
    assert outputs(repo) == before
    return proc.stdout + proc.stderr


def restore(repo, *files):
    """As docs/failures.md says: touch first, or git may take DVC's rewrite for no change."""
    sh("touch", *files, cwd=repo)
    sh("git", "checkout", *files, cwd=repo)


def _one_error_line(log, stage, message):
    lines = [line for line in log.splitlines() if line.startswith(f"[{stage}] error:")]
    assert len(lines) == 1 and message in lines[0], log[-3000:]


@pytest.mark.parametrize("override,message", [
    ("training.batch_size=-4", "training.batch_size: must be > 0, got -4"),
    ("dataset.name=/no/such/corpus", "dataset.name: /no/such/corpus is not a directory"),
    ("pretrained.model_name=/no/such/ckpt", "pretrained.model_name: /no/such/ckpt: no such directory"),
    ("eval.batch_size=0", "eval.batch_size: must be > 0, got 0"),
])
def test_a_value_the_check_stage_refuses_changes_nothing(repo, override, message):
    # the check stage runs first and refuses before any stage works: outputs and dvc.lock stay
    log = _refused(repo, override)
    _one_error_line(log, "check", message)
    assert "Running stage 'prepare'" not in log
    assert "up to date" in dvc("status", cwd=repo).stdout


@pytest.mark.parametrize("stage,override,message", [
    ("prepare", "dataset.train_range=[0.0,0.0001]", "dataset.train_range: [0.0, 0.0001] keeps no whole article"),
    ("train", "training.batch_size=100000", "not one batch of training.batch_size=100000"),
])
def test_a_value_a_later_stage_refuses_leaves_every_output_as_it_was(repo, stage, override, message):
    # found only when the data is read: the stage's one line, its outputs (which DVC deletes
    # before running a stage) as they were; only check's entry in dvc.lock moved, as documented
    log = _refused(repo, override)
    _one_error_line(log, stage, message)
    status = dvc("status", cwd=repo).stdout
    assert status.splitlines()[0] == "check:" and "prepare:" not in status and "train:" not in status, status
    restore(repo, "dvc.lock")
    assert "up to date" in dvc("status", cwd=repo).stdout


def test_after_refusals_runs_and_the_cache_still_give_the_right_outputs(repo):
    # 5e-5 as researchers type it: DVC writes 'lr: 5e-05', a string to YAML 1.1, and the stages take it
    dvc("exp", "run", "-S", "training.lr=5e-5", "-n", "here", cwd=repo)
    assert "  lr: 5e-05\n" in (repo / "params.yaml").read_text()
    here = outputs(repo)
    shutil.rmtree(repo / "models/samba")
    shutil.rmtree(repo / "data/tokenized")
    dvc("checkout", cwd=repo)
    assert outputs(repo) == here
    # the same experiment in a workspace of its own, brought back by exp apply
    dvc("exp", "run", "--temp", "-S", "training.lr=5e-5", "-n", "there", cwd=repo)
    sh("git", "checkout", "--", ".", cwd=repo)
    dvc("checkout", cwd=repo)
    model = "models/samba/model.safetensors"
    assert outputs(repo)[model] != here[model]  # back at the committed run
    dvc("exp", "apply", "there", cwd=repo)
    assert outputs(repo, ["models", "data"]) == {k: v for k, v in here.items() if not k.startswith("metrics/")}
    assert "up to date" in dvc("status", cwd=repo).stdout
