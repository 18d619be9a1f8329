"""The training loop's promises: exact resume wherever an interruption lands (during a step,
validation or a checkpoint write, in the first epoch or a later one), stale checkpoints refused
naming why, validation on schedule, the logged learning rate the one used, a non-finite loss
stopped at its step with earlier outputs kept, keep: best."""

from __future__ import annotations

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import samba.loss
import samba.resume
from samba.checkpoint import CheckpointError
from samba.convert import convert
from samba.train import Trainer, TrainingInterrupted, lr_factor, train

from conftest import params_with, relative_error  # noqa: F401  (project: a fixture of conftest)



def run(params, project: Path, where: Path) -> dict:
    return train(params, project / "data", project / "init", where / "out", where / "metrics", where / "ckpt")


def logged(where: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows dvclive wrote for metric ``name`` (e.g. 'train/loss')."""
    path = where / "metrics/plots/metrics" / f"{name}.tsv"
    with open(path) as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = load_file(a / "out/model.safetensors"), load_file(b / "out/model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert relative_error(wb[key], wa[key]) < tol if wa[key].norm() > 0 else torch.equal(wa[key], wb[key]), key


def assert_same_history(a: Path, b: Path) -> None:
    for name in ("train/loss", "train/lr", "val/ppl", "val/sparsity_l0"):
        ra, rb = logged(a, name), logged(b, name)
        assert [s for s, _ in rb] == [s for s, _ in ra], f"{name}: steps differ (gaps or repeats)"
        for (s, x), (_, y) in zip(ra, rb):
            assert y == pytest.approx(x, rel=1e-6, abs=1e-9), (name, s)


def interrupt_during(monkeypatch, target, attribute: str, call: int) -> None:
    """Send this process SIGINT from inside the ``call``-th call of ``target.attribute``, as a
    Ctrl-C landing there would; the call itself completes."""
    original, calls = getattr(target, attribute), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapper)


@pytest.fixture(scope="module")
def straight(sources, project, tmp_path_factory) -> Path:
    """An uninterrupted run of 2+ epochs: checkpoints every 4 steps, validation every 6."""
    where = tmp_path_factory.mktemp("straight")
    run(RESUME_PARAMS(sources), project, where)
    return where


def RESUME_PARAMS(sources):
    return params_with(sources, training={"max_steps": 0, "epochs": 2, "checkpoint_every": 4, "eval_every": 6,
                                          "log_every": 5, "batch_size": 8, "seq_len": 64})


@pytest.mark.parametrize("where,call", [
    ("validation", 2),          # Ctrl-C while validating after step 12
    ("checkpoint", 3),          # Ctrl-C while writing the checkpoint of step 12
    ("validation", 12),         # ... in the second epoch
])
def test_interrupted_run_resumes_to_the_uninterrupted_weights_and_curves(sources, project, straight, tmp_path,
                                                                          monkeypatch, where, call):
    params = RESUME_PARAMS(sources)
    steps_per_epoch = logged(straight, "train/lr")[-1][0] // 2
    assert 12 < steps_per_epoch < 70, "the third case must land in the second epoch"
    target, attribute = (Trainer, "_validate") if where == "validation" else (samba.resume, "save")
    interrupt_during(monkeypatch, target, attribute, call)
    with pytest.raises(TrainingInterrupted, match=r"interrupted after step (\d+)") as info:
        run(params, project, tmp_path)
    stopped = int(info.value.args[0].split("after step ")[1].split()[0])
    if where == "validation" and call == 12:
        assert stopped == 72 and stopped > steps_per_epoch
    saved = torch.load(tmp_path / "ckpt/last.pt", weights_only=True)
    assert saved["step"] == stopped  # completed steps only: none replayed, none skipped
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    run(params, project, tmp_path)  # resumes
    assert not (tmp_path / "ckpt/last.pt").exists()
    assert_same_weights(straight, tmp_path)
    assert_same_history(straight, tmp_path)


def test_the_run_goes_past_the_first_epoch_with_moving_windows(straight):
    epochs = logged(straight, "train/epoch")
    assert epochs[-1][1] == pytest.approx(2.0)
    assert any(1 < e < 2 for _, e in epochs)


def test_a_checkpoint_of_another_run_is_refused_saying_why(sources, project, tmp_path, monkeypatch):
    params = RESUME_PARAMS(sources)
    interrupt_during(monkeypatch, Trainer, "_validate", 1)
    with pytest.raises(TrainingInterrupted):
        run(params, project, tmp_path)
    monkeypatch.undo()
    other = params_with(sources, training={"max_steps": 0, "epochs": 2, "checkpoint_every": 4, "eval_every": 6,
                                           "log_every": 5, "batch_size": 8, "seq_len": 64, "lr": 2.0e-2})
    with pytest.raises(CheckpointError, match=r"written by another run: params differ \(training.lr: 0.01 -> 0.02\)"):
        run(other, project, tmp_path)
    monkeypatch.setattr(samba.resume, "code_digest", lambda: "other code")
    with pytest.raises(CheckpointError, match="the code in src/samba differs"):
        run(params, project, tmp_path)
    monkeypatch.undo()
    # same sizes, other content: new init weights, new token data
    init2, data2 = tmp_path / "init2", tmp_path / "data2"
    convert(params_with(sources, training={"seed": 5}), init2)
    assert (init2 / "model.safetensors").stat().st_size == (project / "init/model.safetensors").stat().st_size
    with pytest.raises(CheckpointError, match="the init weights"):
        train(params, project / "data", init2, tmp_path / "out", tmp_path / "metrics", tmp_path / "ckpt")
    import shutil

    shutil.copytree(project / "data", data2)
    tokens = (data2 / "train.bin").read_bytes()
    (data2 / "train.bin").write_bytes(tokens[2:4] + tokens[:2] + tokens[4:])  # same length
    with pytest.raises(CheckpointError, match="the token data"):
        train(params, data2, project / "init", tmp_path / "out", tmp_path / "metrics", tmp_path / "ckpt")
    assert (tmp_path / "ckpt/last.pt").is_file()  # refused, not deleted


def test_validation_follows_eval_every_whatever_log_every(sources, project, tmp_path):
    params = params_with(sources, training={"max_steps": 24, "log_every": 4, "eval_every": 6})
    run(params, project, tmp_path)
    assert [s for s, _ in logged(tmp_path, "val/ppl")] == [6, 12, 18, 24]
    assert [s for s, _ in logged(tmp_path, "train/loss")] == [4, 8, 12, 16, 20, 24]


def test_logged_learning_rate_is_the_one_the_step_used(sources, project, tmp_path):
    params = params_with(sources, training={"max_steps": 20, "log_every": 1, "warmup_steps": 5})
    run(params, project, tmp_path)
    t = params.training
    for step, lr in logged(tmp_path, "train/lr"):
        # the row of step s (s steps done) reports the rate of the s-th step, index s - 1
        assert lr == pytest.approx(t.lr * lr_factor(step - 1, t.warmup_steps, 20, t.min_lr_ratio), rel=1e-6)
    assert logged(tmp_path, "train/lr")[0][1] == pytest.approx(t.lr / 5)


def test_non_finite_loss_stops_at_its_step_keeping_checkpoint_and_outputs(sources, project, tmp_path, monkeypatch):
    params = params_with(sources, training={"max_steps": 20, "log_every": 5, "checkpoint_every": 4})
    (tmp_path / "out").mkdir()
    (tmp_path / "out/earlier.txt").write_text("earlier output")
    real, calls = samba.loss.samba_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        parts = real(*args, **kwargs)
        if calls["n"] == 7:  # the 7th step's loss
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(samba.loss, "samba_loss", poisoned)
    with pytest.raises(FloatingPointError, match="training loss is not finite at step 7"):
        run(params, project, tmp_path)
    assert torch.load(tmp_path / "ckpt/last.pt", weights_only=True)["step"] == 4  # the last good one
    assert (tmp_path / "out/earlier.txt").read_text() == "earlier output"


def test_keep_best_keeps_the_lowest_validation_ppl_after_the_warm_up(sources, project, tmp_path):
    # a learning rate high enough to make validation ppl go up again: best != last
    params = params_with(sources, training={"max_steps": 40, "eval_every": 5, "lr": 0.2, "warmup_steps": 1,
                                            "keep": "best", "sparsity_warmup_steps": 10},
                         model={"sparsity_target": 0.5})
    summary = run(params, project, tmp_path)
    val = [(s, p) for s, p in logged(tmp_path, "val/ppl") if s >= 10]
    best_step = min(val, key=lambda r: r[1])[0]
    assert summary["kept_step"] == best_step
    # the kept model is that step's: evaluate it and compare with the logged validation ppl
    from samba import Samba
    from samba.data import TokenWindows, load_split
    from samba.evaluate import evaluate_model

    model = Samba.from_pretrained(tmp_path / "out")
    assert model.config.sparsity_target == 0.5
    windows = TokenWindows.from_numpy(load_split(project / "data", "validation"), 32, torch.device("cpu"))
    m, _ = evaluate_model(model, windows, 4, max_windows=2 * 4, desc=None)
    assert m["ppl"] == pytest.approx(dict(val)[best_step], rel=1e-5)
    if best_step != 40:
        assert not math.isclose(dict(val)[40], dict(val)[best_step])
