"""The training loop's promises: exact resume wherever an interruption lands (during a step,
validation or a checkpoint write, in the first epoch or a later one), stale checkpoints refused
naming why, validation on schedule, the logged learning rate the one used, a non-finite loss
stopped at its step with earlier outputs kept, keep: best."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import samba.loss
import samba.resume
import samba.train
from samba.config import ConfigError, Params, flatten
from samba.convert import convert
from samba.train import TrainingInterrupted, Validator, lr_factor, train

from conftest import params_with, relative_error, tiny_params  # noqa: F401  (project: a fixture of conftest)



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


def interrupt_during(monkeypatch, target, attribute: str, call: int, *signums: int) -> list[int]:
    """Send this process ``signums`` (default SIGINT), one after the other, from inside the
    ``call``-th call of ``target.attribute``, as a Ctrl-C (or a SIGTERM) landing there would; the
    call itself completes. Returns the signals sent, as they are sent."""
    original, calls, sent = getattr(target, attribute), {"n": 0}, []

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            for signum in signums or (signal.SIGINT,):
                sent.append(signum)
                os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapper)
    return sent


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
@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_interrupted_run_resumes_to_the_uninterrupted_weights_and_curves(sources, project, straight, tmp_path,
                                                                          monkeypatch, where, call):
    params = RESUME_PARAMS(sources)
    steps_per_epoch = logged(straight, "train/lr")[-1][0] // 2
    assert 12 < steps_per_epoch < 70, "the third case must land in the second epoch"
    target, attribute = (Validator, "validate") if where == "validation" else (samba.resume, "save")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/metrics.json").write_text("an earlier run's")
    interrupt_during(monkeypatch, target, attribute, call)
    with pytest.raises(TrainingInterrupted, match=r"interrupted after step (\d+)") as info:
        run(params, project, tmp_path)
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["metrics.json"]  # untouched until the end
    assert (tmp_path / "metrics/metrics.json").read_text() == "an earlier run's"
    stopped = int(info.value.args[0].split("after step ")[1].split()[0])
    if where == "validation" and call == 12:
        assert stopped == 72 and stopped > steps_per_epoch
    saved = torch.load(tmp_path / "ckpt/last.pt", weights_only=True)
    assert saved["step"] == stopped  # completed steps only: none replayed, none skipped
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    run(params, project, tmp_path)  # resumes
    assert not (tmp_path / "ckpt/last.pt").exists()
    assert (tmp_path / "metrics/metrics.json").read_text() != "an earlier run's"  # replaced whole
    assert_same_weights(straight, tmp_path)
    assert_same_history(straight, tmp_path)


def test_the_run_goes_past_the_first_epoch_with_moving_windows(straight):
    epochs = logged(straight, "train/epoch")
    assert epochs[-1][1] == pytest.approx(2.0)
    assert any(1 < e < 2 for _, e in epochs)


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_a_checkpoint_of_another_run_is_set_aside_and_the_run_starts_afresh(sources, project, tmp_path,
                                                                            monkeypatch, caplog):
    params = params_with(sources, training={"max_steps": 12, "checkpoint_every": 4, "eval_every": 6})
    interrupt_during(monkeypatch, Validator, "validate", 1)
    with pytest.raises(TrainingInterrupted, match="after step 6 of 12"):
        run(params, project, tmp_path)
    monkeypatch.undo()
    checkpoint = tmp_path / "ckpt/last.pt"
    (tmp_path / "ckpt/best.safetensors").write_bytes(b"that run's best weights")
    original = checkpoint.read_bytes()
    other = params_with(sources, training={"max_steps": 12, "checkpoint_every": 4, "eval_every": 6, "lr": 2.0e-2})
    straight = tmp_path / "straight"
    run(other, project, straight)

    def run_and_find_set_aside(why: str, *args) -> Path:
        caplog.clear()
        with caplog.at_level("INFO", logger="samba"):
            (train(*args) if args else run(other, project, tmp_path))
        line = next(r.getMessage() for r in caplog.records if "set aside as" in r.getMessage())
        assert re.search(why, line), line
        assert "this run starts from step 0" in line and "resuming" not in caplog.text
        assert not checkpoint.exists() and not (tmp_path / "ckpt/best.safetensors").exists()
        return Path(line.split("set aside as ")[1].split(";")[0])

    kept = run_and_find_set_aside(r"written by another run: params differ \(training.lr: 0.01 -> 0.02\)")
    assert re.fullmatch(r"other-run-\d{8}-\d{6}-step6\.pt", kept.name) and kept.parent == checkpoint.parent
    assert kept.read_bytes() == original  # nothing lost ...
    assert kept.with_name(kept.stem + "-best.safetensors").read_bytes() == b"that run's best weights"
    assert_same_weights(straight, tmp_path)  # ... and nothing of it resumed

    # The same checkpoint again (same mtime, so the same name): an earlier one is never replaced.
    shutil.copy2(kept, checkpoint)
    again = run_and_find_set_aside("written by another run")
    assert again.name == kept.stem + "-2.pt" and kept.read_bytes() == again.read_bytes() == original

    shutil.copy2(kept, checkpoint)
    monkeypatch.setattr(samba.resume, "code_digest", lambda: "other code")
    run_and_find_set_aside("written by another run: the code in src/samba differs; set aside as",
                           params, project / "data", project / "init", tmp_path / "out", tmp_path / "metrics",
                           tmp_path / "ckpt")
    monkeypatch.undo()
    # same sizes, other content: new init weights, new token data
    init2, data2 = tmp_path / "init2", tmp_path / "data2"
    convert(params_with(sources, training={"seed": 5}), init2)
    assert (init2 / "model.safetensors").stat().st_size == (project / "init/model.safetensors").stat().st_size
    shutil.copy2(kept, checkpoint)
    run_and_find_set_aside(r"another run: the init weights differ; set aside as", params, project / "data", init2,
                           tmp_path / "out", tmp_path / "metrics", tmp_path / "ckpt")
    shutil.copytree(project / "data", data2)
    tokens = (data2 / "train.bin").read_bytes()
    (data2 / "train.bin").write_bytes(tokens[2:4] + tokens[:2] + tokens[4:])  # same length
    shutil.copy2(kept, checkpoint)
    run_and_find_set_aside(r"another run: the token data differ; set aside as", params, data2, project / "init",
                           tmp_path / "out", tmp_path / "metrics", tmp_path / "ckpt")
    checkpoint.write_bytes(original[:1000])  # cut short, as a full disk would
    unreadable = run_and_find_set_aside(r"last.pt cannot be read \(")
    assert re.fullmatch(r"unreadable-\d{8}-\d{6}\.pt", unreadable.name)
    assert unreadable.read_bytes() == original[:1000]
    assert len(list(checkpoint.parent.glob("*.pt"))) == 6  # every one kept


# What may change across a resume (docs/failures.md, "Interruptions and resuming"): what
# changes neither the weights after any step nor the weights kept. The data set, the
# pretrained source and the teacher count through the files they give (token data, init
# weights, teacher weights), not as params.
OFF_TRAJECTORY = ("training.log_every", "training.checkpoint_every", "compute.", "eval.", "logging.", "dataset.",
                  "pretrained.use_pretrained", "pretrained.model_name", "training.teacher")
ONLY_WITH_KEEP_BEST = ("training.eval_every", "training.eval_batches")


def _changed(data: dict, key: str) -> Params:
    """``data`` with ``key`` set to another valid value."""
    section, name = key.split(".")
    value = data[section][name]
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, (int, float)):
        candidates = [value + 1, value - 1, value * 2 + 2, value / 2, value + 0.25]
    elif isinstance(value, list):
        candidates = [[0.1], [0.0, 0.5], ["native", "pca"]]
    else:
        candidates = ["auto", "cuda", "fp32", "bf16", "reference", "kernels", "l1", "best", "last", "other"]
    for candidate in candidates:
        if candidate != value:
            try:
                return Params.from_dict({**data, section: {**data[section], name: candidate}}, require_all=True)
            except ConfigError:
                pass
    raise AssertionError(f"no other valid value for {key}")


@pytest.mark.parametrize("keep", ["last", "best"])
def test_the_fingerprint_holds_exactly_what_changes_the_trajectory(sources, project, keep):
    data = tiny_params(sources)
    data["training"]["keep"] = keep
    inputs = {"init": project / "init", "data": project / "data"}
    base = samba.resume.fingerprint(Params.from_dict(data, require_all=True), "fp32", inputs)
    for key in flatten(data):
        off = key.startswith(OFF_TRAJECTORY) or (keep == "last" and key in ONLY_WITH_KEEP_BEST)
        reasons = samba.resume.differences(base, samba.resume.fingerprint(_changed(data, key), "fp32", inputs))
        assert (reasons == []) == off, (key, reasons)
        if not off:
            assert f"{key}: " in reasons[0], reasons
    # the precision as resolved on the device (auto is bf16 on CUDA, fp32 on the CPU)
    bf16 = samba.resume.fingerprint(Params.from_dict(data, require_all=True), "bf16", inputs)
    assert samba.resume.differences(base, bf16) == ["params differ (precision: 'fp32' -> 'bf16')"]


def test_a_distillation_teacher_counts_by_its_files_not_its_path(sources, project, tmp_path, monkeypatch, caplog):
    here, there = tmp_path / "teacher", tmp_path / "moved"
    shutil.copytree(project / "init", here)
    shutil.copytree(project / "init", there)
    params = params_with(sources, training={"distill_weight": 1.0, "teacher": str(here), "max_steps": 12,
                                            "checkpoint_every": 4, "eval_every": 6})
    inputs = {"init": project / "init", "data": project / "data"}
    key = samba.resume.fingerprint(params, "fp32", {**inputs, "teacher": here})
    assert samba.resume.differences(key, samba.resume.fingerprint(params, "fp32", {**inputs, "teacher": there})) == []
    # the train stage fingerprints the teacher it distils from
    interrupt_during(monkeypatch, Validator, "validate", 1)
    with pytest.raises(TrainingInterrupted, match="after step 6 of 12"):
        run(params, project, tmp_path)
    monkeypatch.undo()
    weights = load_file(here / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, here / "model.safetensors")
    with caplog.at_level("INFO", logger="samba"):
        run(params, project, tmp_path)
    assert "last.pt was written by another run: the teacher's weights differ; set aside as" in caplog.text


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_what_is_off_the_trajectory_may_change_across_a_resume_even_the_device(sources, project, straight, tmp_path,
                                                                             monkeypatch, caplog):
    interrupt_during(monkeypatch, Validator, "validate", 2)
    with pytest.raises(TrainingInterrupted, match="after step 12 "):
        run(RESUME_PARAMS(sources), project, tmp_path)
    monkeypatch.undo()
    # as a CUDA run with graphs saves its optimizer (fused, capturable, the rate a tensor)
    state = torch.load(tmp_path / "ckpt/last.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(lr=torch.tensor(group["lr"]), capturable=True, fused=True)
    torch.save(state, tmp_path / "ckpt/last.pt")
    changed = params_with(sources, training={"max_steps": 0, "epochs": 2, "checkpoint_every": 7, "eval_every": 5,
                                             "eval_batches": 1, "log_every": 3, "batch_size": 8, "seq_len": 64},
                          compute={"precision": "fp32", "backend": "reference", "compile": False, "cuda_graphs": False},
                          eval={"batch_size": 3, "near_zero_eps": 0.5}, logging={"project_name": "elsewhere"})
    with caplog.at_level("INFO", logger="samba"):
        run(changed, project, tmp_path)
    assert "at step 12 of" in caplog.text and "set aside" not in caplog.text
    assert_same_weights(straight, tmp_path)


def test_resume_keeps_the_learning_rate_tensor_the_captured_step_reads(sources, project):
    """Under CUDA graphs the captured step reads the learning rate from the device tensor that
    make_optimizer made: loading a checkpoint must copy the saved rate into that tensor, not
    replace it; and the optimizer keeps running as made here, whatever saved the checkpoint
    (the CPU stands in for the device: tensor identity and flags are checked here, the GPU
    tests check the steps)."""
    from samba import Samba
    from samba.train import make_optimizer

    t, cpu = RESUME_PARAMS(sources).training, torch.device("cpu")
    model = Samba.from_pretrained(project / "init")
    for saved_with_graphs in (True, False):
        before = make_optimizer(model, t, cpu, graphs=saved_with_graphs)
        for g in before.param_groups:
            g["lr"] = torch.tensor(0.123) if saved_with_graphs else 0.123  # the rate at the checkpoint
        buffer = io.BytesIO()
        torch.save(before.state_dict(), buffer)
        for graphs in (True, False):
            buffer.seek(0)
            optimizer = make_optimizer(model, t, cpu, graphs=graphs)
            made = [g["lr"] for g in optimizer.param_groups]
            samba.resume.load_optimizer_state(optimizer, torch.load(buffer, map_location="cpu", weights_only=True))
            for group, lr in zip(optimizer.param_groups, made):
                if graphs:
                    assert isinstance(lr, torch.Tensor) and group["lr"] is lr and float(lr) == pytest.approx(0.123)
                else:
                    assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.123)
                assert (group["capturable"], group["fused"]) == (graphs, False)  # as made here


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_kill_9_mid_step_then_resume_follows_the_schedule_to_the_uninterrupted_weights(sources, project, tmp_path):
    """The GPU tests' check (tests/resume_probe.py) on the CPU: the stage killed during its 13th
    step, run again; the learning rate read from the optimizer at every step."""
    from resume_probe import check_interrupted_run_resumes_exactly

    data = tiny_params(sources)
    data["training"].update(max_steps=20, checkpoint_every=8)
    check_interrupted_run_resumes_exactly(data, project, tmp_path, "KILL", 13)


def test_validation_follows_eval_every_whatever_log_every(sources, project, tmp_path):
    params = params_with(sources, training={"max_steps": 24, "log_every": 4, "eval_every": 6})
    run(params, project, tmp_path)
    assert [s for s, _ in logged(tmp_path, "val/ppl")] == [6, 12, 18, 24]
    assert [s for s, _ in logged(tmp_path, "train/loss")] == [4, 8, 12, 16, 20, 24]


@pytest.mark.parametrize("signum,target,attribute", [
    (signal.SIGTERM, samba.train, "plot_training_curves"),       # after the model is written
    (signal.SIGINT, samba.train, "plot_training_curves"),
    (signal.SIGTERM, samba.resume.Checkpointer, "complete"),     # as the checkpoint goes
], ids=["SIGTERM-model-written", "SIGINT-model-written", "SIGTERM-checkpoint-going"])
def test_a_stop_asked_after_the_last_step_lets_the_run_finish(sources, project, tmp_path, monkeypatch, caplog,
                                                             signum, target, attribute):
    # the sweep on the GPU stops its runs with SIGTERM at a deadline: one that arrived while a run
    # wrote its model (2026-12-07) killed it there, and its last steps, which no checkpoint held, were lost
    def default(received, frame):  # what the signal does where the stage does not handle it
        raise RuntimeError(f"{signal.Signals(received).name} reached the default handler")

    previous = signal.signal(signum, default)
    try:
        interrupt_during(monkeypatch, target, attribute, 1, signum)
        params = params_with(sources, training={"max_steps": 6, "checkpoint_every": 4})
        with caplog.at_level("WARNING", logger="samba"):
            summary = run(params, project, tmp_path)
        assert signal.getsignal(signum) is default  # the stage's handler gone with the stage
    except KeyboardInterrupt:
        pytest.fail("the stop request ended the run")
    finally:
        signal.signal(signum, previous)
    assert f"{signal.Signals(signum).name}: every step is done; writing the model and metrics first" in caplog.text
    assert summary["steps"] == 6 and (tmp_path / "out/model.safetensors").is_file()
    assert json.loads((tmp_path / "metrics/summary.json").read_text())["steps"] == 6
    assert not (tmp_path / "ckpt/last.pt").exists()  # complete: nothing left to resume


def test_a_second_ctrl_c_while_the_run_finishes_stops_it_at_once(sources, project, tmp_path, monkeypatch):
    # SIGTERM, then a Ctrl-C: the user means it
    sent = interrupt_during(monkeypatch, samba.train, "plot_training_curves", 1, signal.SIGTERM, signal.SIGINT)
    params = params_with(sources, training={"max_steps": 6, "checkpoint_every": 4})
    with pytest.raises(KeyboardInterrupt):
        run(params, project, tmp_path)
    assert sent == [signal.SIGTERM, signal.SIGINT]
    assert torch.load(tmp_path / "ckpt/last.pt", weights_only=True)["step"] == 4  # what a rerun resumes from


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


def test_keep_best_keeps_the_lowest_validation_ppl_at_the_target(sources, project, tmp_path):
    # a learning rate high enough to make validation ppl go up again: best != last. The validation
    # after step 10 runs at the fraction of step index 9 (0.45): no candidate.
    params = params_with(sources, training={"max_steps": 40, "eval_every": 5, "lr": 0.2, "warmup_steps": 1,
                                            "keep": "best", "sparsity_warmup_steps": 10},
                         model={"sparsity_target": 0.5})
    summary = run(params, project, tmp_path)
    val = [(s, p) for s, p in logged(tmp_path, "val/ppl") if s > 10]
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


def test_keep_best_restores_the_weights_of_the_best_validation(sources, project, tmp_path, monkeypatch):
    # The validation ppl is scripted (lowest at step 10 of 20) and the weights are copied as each
    # validation sees them: the model written must be step 10's, not the last step's.
    import samba.train

    scripted, seen = [30.0, 20.0, 25.0, 28.0], []
    real = samba.train.Validator.validate

    def validate(self):
        row = real(self)
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return {**row, "val/ppl": scripted[len(seen) - 1]}

    monkeypatch.setattr(samba.train.Validator, "validate", validate)
    params = params_with(sources, training={"max_steps": 20, "eval_every": 5, "keep": "best"})
    summary = run(params, project, tmp_path)
    assert len(seen) == 4 and summary["kept_step"] == 10
    written = load_file(tmp_path / "out/model.safetensors")
    assert all(torch.equal(written[k], seen[1][k]) for k in written)
    assert not all(torch.equal(written[k], seen[3][k]) for k in written)  # not the last weights
    headline = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert headline == {"steps": 20, "tokens": 20 * 4 * 32, "val_ppl": 20.0}  # the kept weights' validation


def test_keep_best_keeps_no_weights_validated_below_the_target(sources, project, tmp_path, caplog):
    # the ramp ends with the run: the last validation (step 40) ran at the fraction of step index 39,
    # 0.4875, while the saved model applies 0.5. Nothing is kept as best; the run says so.
    params = params_with(sources, training={"max_steps": 40, "eval_every": 5, "keep": "best",
                                            "sparsity_warmup_steps": 40}, model={"sparsity_target": 0.5})
    summary = run(params, project, tmp_path)
    assert "kept_step" not in summary
    assert "no validation ran at model.sparsity_target" in caplog.text
    assert "the sparsity ramp (40 steps) does not end before the run's last step" in caplog.text


def test_the_ramp_can_be_a_fraction_of_the_run(sources, project, tmp_path):
    # 40 steps, a quarter of them ramping: the fraction reaches 0.5 at step index 10
    params = params_with(sources, training={"max_steps": 40, "log_every": 1, "sparsity_warmup_steps": 0,
                                            "sparsity_warmup_fraction": 0.25}, model={"sparsity_target": 0.5})
    run(params, project, tmp_path)
    fractions = dict(logged(tmp_path, "train/sparsity_fraction"))
    assert [fractions[s] for s in (1, 5, 10, 11, 40)] == pytest.approx([0.0, 0.2, 0.45, 0.5, 0.5])
    # the run's headline (what DVC tabulates): its budget, and the last validation under keep: last
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary == {"steps": 40, "tokens": 40 * 4 * 32, "val_ppl": dict(logged(tmp_path, "val/ppl"))[40]}


def test_the_code_digest_follows_file_contents_not_only_names(tmp_path):
    import shutil

    package = Path(samba.resume.__file__).resolve().parent
    copy = tmp_path / "samba"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert samba.resume.code_digest(copy) == samba.resume.code_digest()
    (copy / "loss.py").write_text((copy / "loss.py").read_text().replace("readout_weight", "readout_weigth"))
    assert samba.resume.code_digest(copy) != samba.resume.code_digest()  # same names, other code


def test_the_ramp_over_sparsity_warmup_steps_is_the_one_each_step_applies(sources, project, tmp_path, monkeypatch):
    # training.sparsity_warmup_steps 8, target 0.5, d_model 16: step index i trains at
    # 0.5 * min(1, i / 8), so with round(16 f) zeros per token: i zeros up to index 8, then 8.
    # The row of step s (s steps done) logs the fraction of its last step, index s - 1.
    from samba import Samba

    zeros = []  # per training forward, per chunk: (fewest, most) zeros in a token's output
    original = Samba.sparsify

    def counted(self, x, chunk=0):
        out = original(self, x, chunk)
        if self.training:
            per_token = (out == 0).sum(-1)
            zeros.append((int(per_token.min()), int(per_token.max())))
        return out

    monkeypatch.setattr(Samba, "sparsify", counted)
    params = params_with(sources, training={"max_steps": 12, "log_every": 1, "sparsity_warmup_steps": 8},
                         model={"sparsity_target": 0.5})
    run(params, project, tmp_path)
    fractions = logged(tmp_path, "train/sparsity_fraction")
    assert [s for s, _ in fractions] == list(range(1, 13))
    assert [f for _, f in fractions] == pytest.approx(
        [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.5, 0.5, 0.5])
    by_step = [zeros[i:i + 2] for i in range(0, len(zeros), 2)]  # 2 chunks per forward
    assert by_step == [[(n, n)] * 2 for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8)]


def test_each_epoch_draws_its_windows_without_repeats_in_an_order_of_its_own(sources, project, tmp_path, monkeypatch):
    # Three epochs of the training loop, recording the windows it hands the step (the step itself
    # stubbed out: what is checked is the order, and three epochs of real steps take minutes here).
    import samba.train
    from samba.data import TokenWindows, load_split

    n_tokens = len(load_split(project / "data", "train"))
    B, L = 8, 32
    seen = []  # (offset, window indices) of each training batch
    original = TokenWindows.batch

    def recorded(self, windows):
        if len(self.tokens) == n_tokens:  # the train split (validation reads its own, shorter one)
            seen.append((self.offset, windows.tolist()))
        return original(self, windows)

    monkeypatch.setattr(TokenWindows, "batch", recorded)
    monkeypatch.setattr(samba.train, "training_step", lambda *args: lambda inputs, targets: torch.zeros(4))
    params = params_with(sources, training={"max_steps": 0, "epochs": 3, "batch_size": B, "seq_len": L,
                                            "eval_every": 10_000, "log_every": 10_000})
    run(params, project, tmp_path)
    per_epoch = (n_tokens - 1 - (L - 1)) // L // B  # steps of the shortest epoch (the largest offset)
    assert len(seen) == 3 * per_epoch and per_epoch >= 3
    orders = []
    for e in range(3):
        batches = seen[e * per_epoch:(e + 1) * per_epoch]
        offsets = {offset for offset, _ in batches}
        assert len(offsets) == 1 and (e > 0 or offsets == {0}), (e, offsets)
        n_windows = (n_tokens - 1 - offsets.pop()) // L
        order = [w for _, ws in batches for w in ws]
        assert len(set(order)) == len(order), f"epoch {e} repeats a window"
        assert all(0 <= w < n_windows for w in order)
        orders.append(order)
    for a in range(3):
        for b in range(a + 1, 3):
            assert orders[a] != orders[b], f"epochs {a} and {b} visit their windows in the same order"


def test_the_first_step_is_adamw_on_the_clipped_gradient(sources, project, tmp_path):
    # By hand: the gradient g of the first batch at the init weights, clipped to norm c
    # (g c / ||g||), then AdamW's first step, which is lr * g_hat / (|g_hat| + eps) per entry
    # (m / (1 - beta1) = g_hat, sqrt(v / (1 - beta2)) = |g_hat|; no weight decay here). With c
    # so small that |g_hat| is near eps, that differs from the unclipped step, ~ lr * sign(g).
    from samba import Samba
    from samba.data import TokenWindows, load_split
    from samba.train import epoch_order, training_objective

    clip = 1.0e-6
    params = params_with(sources, training={"max_steps": 1, "weight_decay": 0.0, "grad_clip": clip})
    run(params, project, tmp_path)
    t = params.training
    lr = t.lr * lr_factor(0, t.warmup_steps, 1, t.min_lr_ratio)
    model = Samba.from_pretrained(project / "init").train()
    windows = TokenWindows.from_numpy(load_split(project / "data", "train"), t.seq_len, torch.device("cpu"))
    _, order = epoch_order(t.seed, 0, len(windows.tokens), t.seq_len)
    total, _ = training_objective(model, t)(*windows.batch(order[:t.batch_size]))
    total.backward()
    named = dict(model.named_parameters())
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in named.values()))
    assert norm > 1e3 * clip  # the clip acts
    eps = 1e-8  # AdamW's default, which make_optimizer keeps
    after = load_file(tmp_path / "out/model.safetensors")
    for name, p in named.items():
        g_hat = p.grad.double() * clip / norm
        want = p.detach().double() - lr * g_hat / (g_hat.abs() + eps)
        err = float((after[name].double() - want).abs().max())
        assert err < 1e-3 * lr, f"{name}: off the hand step by {err:.2e} (lr {lr:.1e})"
    unclipped = {n: lr * p.grad.double() / (p.grad.double().abs() + eps) for n, p in named.items()}
    moved = {n: named[n].detach().double() - after[n].double() for n in named}
    differs = sum(float((moved[n] - unclipped[n]).abs().sum()) for n in named) / sum(p.numel() for p in named.values())
    assert differs > 0.1 * lr  # without the clip the step would be another, by this much per entry
