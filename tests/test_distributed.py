"""Data parallelism on the CPU (gloo): 2 processes follow 1 process's trajectory at the same
global batch, and a hard kill of 2 processes resumes to the uninterrupted weights."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from samba.config import Params
from samba.convert import convert
from samba.data import prepare_tokens
from samba.train import train

from conftest import REPO, relative_error, tiny_params, tool_env

pytestmark = pytest.mark.e2e


def params_dict(sources: Path, processes: int) -> dict:
    data = tiny_params(sources)
    data["training"].update(max_steps=40, batch_size=8, seq_len=32, log_every=2, eval_every=10,
                            checkpoint_every=10)
    data["compute"].update(num_processes=processes)
    return data


@pytest.fixture(scope="module")
def project(sources, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    params = Params.from_dict(params_dict(sources, 1), require_all=True)
    prepare_tokens(params.dataset, root / "data")
    convert(params, root / "init")
    return root


def stage(project: Path, where: Path, params: dict, **popen) -> subprocess.Popen:
    """The train stage script, as dvc repro runs it."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(REPO / "stages/train.py"), "--params", str(where / "params.yaml"),
           "--data", str(project / "data"), "--init", str(project / "init"), "--out", str(where / "out"),
           "--metrics", str(where / "metrics"), "--checkpoints", str(where / "ckpt")]
    popen.setdefault("env", tool_env())
    return subprocess.Popen(cmd, cwd=where, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"
    return err


def losses(where: Path) -> list[tuple[int, float]]:
    with open(where / "metrics/plots/metrics/train/loss.tsv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="module")
def two_processes(sources, project, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("two")
    params = params_dict(sources, 2)
    params["logging"]["use_wandb"] = importlib.util.find_spec("wandb") is not None
    err = finish(stage(project, where, params, env=tool_env(WANDB_MODE="offline", WANDB_DIR=str(where),
                                                             WANDB_SILENT="true")))
    assert "2 processes" in err
    return where


def test_only_rank_0_logs(two_processes):
    pytest.importorskip("wandb", reason="wandb is in requirements.txt")
    from wandb_log import offline_run

    config, history = offline_run(two_processes)  # asserts there is exactly one run
    assert sorted(history) == list(range(2, 41, 2)) and config["compute"]["num_processes"] == 2


def test_two_processes_follow_one_process(sources, project, two_processes, tmp_path):
    one = tmp_path / "one"
    train(Params.from_dict(params_dict(sources, 1), require_all=True), project / "data", project / "init",
          one / "out", one / "metrics", one / "ckpt")
    a, b = load_file(one / "out/model.safetensors"), load_file(two_processes / "out/model.safetensors")
    for key in a:
        assert relative_error(b[key], a[key]) < 1e-4, key
    la, lb = losses(one), losses(two_processes)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(2, 41, 2))
    for (step, x), (_, y) in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-4), step


def test_kill_9_of_two_processes_resumes_to_the_same_weights(sources, project, two_processes, tmp_path):
    params = params_dict(sources, 2)
    proc = stage(project, tmp_path, params, start_new_session=True)
    checkpoint = tmp_path / "ckpt/last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, as kill -9 of the stage
    _, err = proc.communicate()
    assert checkpoint.exists() and not (tmp_path / "out").exists(), f"not killed mid-run:\n{err[-3000:]}"
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 10 <= step < 40
    err = finish(stage(project, tmp_path, params))
    assert f"resuming from {checkpoint} at step {step}" in err
    a, b = load_file(two_processes / "out/model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    for key in a:
        assert relative_error(b[key], a[key]) < 1e-6, key
    resumed, straight = losses(tmp_path), losses(two_processes)
    assert [s for s, _ in resumed] == [s for s, _ in straight]  # every logged step once
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], rel=1e-6)
