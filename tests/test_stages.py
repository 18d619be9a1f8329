"""Each stage on good and bad input: refusals name the key and leave earlier outputs alone;
training resumes after an interruption; a frozen backbone stays put."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from samba import Samba
from samba.config import ConfigError
from samba.convert import convert
from samba.data import DataError
from samba.evaluate import QualityError, evaluate_pipeline, headline
from samba.model_files import CheckpointError
from samba.train import train

from conftest import REPO, make_transformers_mamba, params_with, save_as_mamba_ssm, tiny_params



def _train(params, project, out, tmp_path):
    return train(params, project / "data", project / "init", out, tmp_path / "metrics", tmp_path / "ckpt")


# ----------------------------------------------------------------------------- convert

def test_convert_mamba_ssm_format_checks_against_transformers(sources, tmp_path):
    src = save_as_mamba_ssm(make_transformers_mamba(vocab_size=264), tmp_path / "ssm")
    report = convert(params_with(sources, pretrained={"model_name": str(src)}), tmp_path / "init")
    assert report["format"] == "mamba_ssm" and report["logits_relative_error"] < 1e-5
    assert Samba.from_pretrained(tmp_path / "init").config.readout_stride == 2


def test_convert_random_init_is_seeded(sources, tmp_path):
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        convert(params_with(sources, pretrained={"use_pretrained": False}, training={"seed": seed}),
                tmp_path / name)
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embedding.weight"], c["embedding.weight"])


def test_convert_says_why_its_check_takes_the_reference_path(sources, tmp_path, caplog, monkeypatch):
    from samba.ops import kernels

    monkeypatch.setattr(kernels, "_announced", set())  # each path is logged once per process
    params = params_with(sources, pretrained={"use_pretrained": False})
    assert params.compute.backend == "auto"
    with caplog.at_level(logging.INFO, logger="samba"):
        convert(params, tmp_path / "init")
        Samba(params.model, backend="reference")(torch.zeros(1, 3, dtype=torch.long))  # outside convert
    paths = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Mamba mixer:")]
    assert paths == ["Mamba mixer: plain-PyTorch reference scan (convert checks the written model's logits on it, "
                     "whatever compute.backend says: the check is of the weights, which are the same on either "
                     "path, and this path is independent of the mamba-ssm kernels that transformers' "
                     "MambaForCausalLM calls on the GPU)",
                     "Mamba mixer: plain-PyTorch reference scan (forced by backend='reference')"]


def test_convert_refuses_a_model_section_that_disagrees(sources, tmp_path):
    out = tmp_path / "init"
    out.mkdir()
    (out / "marker").write_text("earlier")
    with pytest.raises(CheckpointError, match="d_state: the checkpoint .* has d_state=4, but 8"):
        convert(params_with(sources, model={"d_state": 8}), out)
    assert (out / "marker").read_text() == "earlier"


# ----------------------------------------------------------------------------- train

def test_train_refuses_nothing_to_train(sources, project, tmp_path):
    params = params_with(sources, pretrained={"freeze_backbone": True}, training={"readout_weight": 0.0})
    with pytest.raises(ConfigError, match="training.readout_weight: is 0 while pretrained.freeze_backbone"):
        _train(params, project, tmp_path / "out", tmp_path)


def test_train_refuses_wandb_without_wandb(sources, project, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    params = params_with(sources, logging={"use_wandb": True})
    with pytest.raises(ConfigError, match="logging.use_wandb: true but wandb is not installed"):
        _train(params, project, tmp_path / "out", tmp_path)


def test_train_refuses_too_little_data(sources, project, tmp_path):
    params = params_with(sources, training={"batch_size": 4096})
    with pytest.raises(DataError, match="not one batch of training.batch_size=4096"):
        _train(params, project, tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_train_refuses_init_of_another_model_section(sources, project, tmp_path):
    params = params_with(sources, model={"readout_hidden_dim": 12})
    with pytest.raises(ConfigError, match="readout_hidden_dim.*rerun the convert stage"):
        _train(params, project, tmp_path / "out", tmp_path)


def test_frozen_backbone_changes_only_the_readout(sources, project, tmp_path):
    params = params_with(sources, pretrained={"freeze_backbone": True}, training={"max_steps": 5})
    _train(params, project, tmp_path / "out", tmp_path)
    before = load_file(project / "init/model.safetensors")
    after = load_file(tmp_path / "out/model.safetensors")
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != key.startswith("readout."), key


def test_training_logs_metrics_for_dvclive(sources, project, tmp_path):
    _train(params_with(sources), project, tmp_path / "out", tmp_path)
    summary = json.loads((tmp_path / "metrics/metrics.json").read_text())
    assert summary["step"] == 30
    for key in ("loss", "main_ce", "readout_ce", "penalty", "lr", "tokens_per_s"):
        assert key in summary["train"], key
    for key in ("ppl", "readout_ppl", "sparsity_near_zero_rel"):
        assert key in summary["val"], key
    steps = (tmp_path / "metrics/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(steps) == 1 + 30 // 5
    assert (tmp_path / "metrics/training_curves.png").stat().st_size > 0


# ----------------------------------------------------------------------------- evaluate

def _transformers_metrics(hf, windows, batch_size):
    """ppl and top-1 accuracy of a transformers MambaForCausalLM on the same windows."""
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in windows.batches(batch_size):
            logits = hf(inputs, use_cache=False).logits.double()
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            hits += int((logits.argmax(-1) == targets).sum())
            n += targets.numel()
    return math.exp(nll / n), hits / n


def test_evaluate_against_transformers(sources, project, tmp_path):
    # Evaluation ppl and accuracy of both models, held against transformers' MambaForCausalLM on
    # the same windows: the baseline against the source checkpoint read by transformers itself,
    # the trained model against its backbone exported to transformers.
    from transformers import MambaForCausalLM

    from samba.data import TokenWindows, load_split
    from samba.export import to_transformers

    params = params_with(sources, training={"max_steps": 10})
    _train(params, project, tmp_path / "trained", tmp_path)
    metrics = evaluate_pipeline(params, project / "data", project / "init", tmp_path / "trained",
                                tmp_path / "eval.json", tmp_path / "plots")
    windows = TokenWindows.from_numpy(load_split(project / "data", "test"), params.training.seq_len,
                                      torch.device("cpu"))
    for got, hf in ((metrics["baseline"], MambaForCausalLM.from_pretrained(sources / "mamba").eval()),
                    (metrics, to_transformers(Samba.from_pretrained(tmp_path / "trained")))):
        ppl, accuracy = _transformers_metrics(hf, windows, params.eval.batch_size)
        assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert got["accuracy"] == pytest.approx(accuracy, abs=1.5 / metrics["protocol"]["tokens"])
    assert metrics["ppl"] < metrics["baseline"]["ppl"]  # 10 steps at lr 1e-2 on this corpus help
    rows = json.loads((tmp_path / "plots/magnitude_histogram.json").read_text())
    assert len(rows) == params.eval.histogram_bins
    assert sum(r["trained"] for r in rows) == pytest.approx(1.0)
    assert metrics["protocol"]["precision"] == "fp32" and metrics["protocol"]["backend"] == "reference"


def test_evaluate_writes_the_pca_prune_curve_and_the_headline(sources, project, tmp_path):
    from samba.data import TokenWindows, load_split
    from samba.evaluate import evaluate_model, pca_bases, prune_curve_in_basis

    params = params_with(sources, eval={"prune_basis": ["native", "pca"], "pca_windows": 2,
                                        "prune_fractions": [0.0, 0.5]})
    summary = tmp_path / "summary.json"
    metrics = evaluate_pipeline(params, project / "data", project / "init", project / "init",
                                tmp_path / "eval.json", tmp_path / "plots", summary)
    saved = json.loads((tmp_path / "eval.json").read_text())
    # the axes from the first eval.pca_windows windows of the validation split (not the test split)
    model, ev, L = Samba.from_pretrained(project / "init"), params.eval, params.training.seq_len
    validation = TokenWindows.from_numpy(load_split(project / "data", "validation"), L, torch.device("cpu"))
    test = TokenWindows.from_numpy(load_split(project / "data", "test"), L, torch.device("cpu"))
    assert len(validation) > 2
    main, _ = evaluate_model(model, test, ev.batch_size, max_windows=ev.max_windows, desc=None)
    bases = pca_bases(model, validation, ev.batch_size, 2)
    expected = prune_curve_in_basis(model, test, (0.5,), main, ev.batch_size, bases,
                                    max_windows=ev.max_windows, desc=None)
    assert saved["prune_curve_pca"]["0.5"]["ppl"] == pytest.approx(expected["0.5"]["ppl"], rel=1e-6)
    for record in (saved, saved["baseline"]):
        assert record["prune_curve_pca"].keys() == record["prune_curve"].keys() == {"0", "0.5"}
        assert record["prune_curve_pca"]["0"] == {"fraction": 0.0, "ppl": record["ppl"],
                                                  "readout_ppl": record["readout_ppl"]}
        assert record["prune_curve_pca"]["0.5"]["ppl"] != record["prune_curve"]["0.5"]["ppl"]
    assert saved["protocol"]["prune_basis"] == ["native", "pca"] and saved["protocol"]["pca_windows"] == 2
    rows = json.loads((tmp_path / "plots/prune_curve.json").read_text())
    assert [r["fraction"] for r in rows] == [0.0, 0.5]
    assert rows[1]["trained_pca_ppl"] == saved["prune_curve_pca"]["0.5"]["ppl"]
    # the headline: what DVC tabulates, a few numbers, the per-chunk detail left in eval.json
    head = json.loads(summary.read_text())
    s, last = saved["sparsity"], max(saved["sparsity"]["chunk_rms"], key=int)
    assert head == {
        "ppl": saved["ppl"], "readout_ppl": saved["readout_ppl"], "accuracy": saved["accuracy"],
        "readout_accuracy": saved["readout_accuracy"], "ppl_ratio": saved["ppl_ratio"],
        "sparsity": {"l0": s["l0"], "l0_min_chunk": s["l0_min_chunk"], "near_zero_rel": s["near_zero_rel"],
                     "last_chunk_rms": s["chunk_rms"][last], "max_over_rms": max(s["max_over_rms"].values())},
        "baseline": {k: saved["baseline"][k] for k in ("ppl", "readout_ppl", "accuracy")}}
    assert head["readout_accuracy"] != head["accuracy"] or head["baseline"]["readout_ppl"] != head["baseline"]["ppl"]


def test_the_headline_takes_the_last_chunk_and_the_largest_max_over_rms():
    chunks = [str(c) for c in range(12)]  # '11' is the last chunk, though '9' sorts after it as text
    sparsity = {"l0": 0.5, "l0_min_chunk": 0.4, "near_zero_rel": 0.6, "chunk_rms": {c: float(c) for c in chunks},
                "max_over_rms": {c: 3.0 if c != "7" else 30.0 for c in chunks}}
    metrics = {"ppl": 10.0, "readout_ppl": 11.0, "accuracy": 0.3, "readout_accuracy": 0.28, "ppl_ratio": 0.5,
               "sparsity": sparsity, "baseline": {"ppl": 20.0, "readout_ppl": 21.0, "accuracy": 0.2}}
    assert headline(metrics) == {
        "ppl": 10.0, "readout_ppl": 11.0, "accuracy": 0.3, "readout_accuracy": 0.28, "ppl_ratio": 0.5,
        "sparsity": {"l0": 0.5, "l0_min_chunk": 0.4, "near_zero_rel": 0.6, "last_chunk_rms": 11.0,
                     "max_over_rms": 30.0},
        "baseline": {"ppl": 20.0, "readout_ppl": 21.0, "accuracy": 0.2}}


def test_evaluate_needs_the_trained_model(sources, project, tmp_path):
    out = tmp_path / "eval.json"
    out.write_text("{}")
    with pytest.raises(CheckpointError, match="no model there; run the train stage first"):
        evaluate_pipeline(params_with(sources), project / "data", project / "init", tmp_path / "missing",
                          out, tmp_path / "plots")
    assert out.read_text() == "{}"


def test_evaluate_quality_gate(sources, project, tmp_path):
    # judged against a better model (one trained a few steps), the untrained init fails the
    # gate; the metrics are still written
    params = params_with(sources, training={"max_steps": 10}, eval={"max_ppl_increase": 1.0e-3})
    _train(params, project, tmp_path / "better", tmp_path)
    with pytest.raises(QualityError, match="above the baseline"):
        evaluate_pipeline(params, project / "data", tmp_path / "better", project / "init",
                          tmp_path / "eval.json", tmp_path / "plots")
    assert json.loads((tmp_path / "eval.json").read_text())["ppl_ratio"] > 1.001


def test_evaluate_failing_midway_leaves_the_earlier_metrics_and_plots(sources, project, tmp_path, monkeypatch):
    import samba.evaluate

    out, plots = tmp_path / "eval.json", tmp_path / "plots"
    plots.mkdir()
    for name in ("magnitude_histogram.json", "prune_curve.png"):
        (plots / name).write_text("an earlier run's")
    out.write_text("{}")

    def fails(*args):
        raise OSError("disk full")

    monkeypatch.setattr(samba.evaluate, "write_prune_curve", fails)  # after the other plots are written
    with pytest.raises(OSError, match="disk full"):
        evaluate_pipeline(params_with(sources), project / "data", project / "init", project / "init", out, plots)
    assert sorted(p.name for p in plots.iterdir()) == ["magnitude_histogram.json", "prune_curve.png"]
    assert all(p.read_text() == "an earlier run's" for p in plots.iterdir()) and out.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch left


# ----------------------------------------------------------------------------- the scripts

@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_stage_script_refuses_bad_params_and_keeps_outputs(sources, tmp_path):
    data = tiny_params(sources)
    data["training"]["lr"] = "1e-4,"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data))
    out = tmp_path / "tokenized"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(bad),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "[prepare] error: training.lr: must be a number, got the string '1e-4,'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "meta.json").read_text() == "{}"


# ----------------------------------------------------------------------------- check

def _check_stage(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "stages"))
    spec = importlib.util.spec_from_file_location("check_stage", REPO / "stages/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _params_file(directory, data, **changes):
    for section, values in changes.items():
        data[section].update({k: v.format(repo=directory) if isinstance(v, str) else v for k, v in values.items()})
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def check_repo(tmp_path, monkeypatch):
    """A repository directory holding this project's dvc.yaml, the working directory (where DVC
    runs the stages), and the check stage's main."""
    main = _check_stage(monkeypatch)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (tmp_path / "corpus.txt").write_text("not a dataset directory\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, main


@pytest.mark.parametrize("section,values,error,message", [
    ("dataset", {"name": "/no/such/corpus"}, DataError, "dataset.name: /no/such/corpus is not a directory"),
    ("dataset", {"name": "corpus.txt"}, DataError, "dataset.name: corpus.txt is not a directory"),  # a file here
    ("dataset", {"tokenizer": "/no/such/tokenizer.json"}, DataError,
     "dataset.tokenizer: /no/such/tokenizer.json does not exist"),
    ("pretrained", {"model_name": "/no/such/ckpt"}, CheckpointError,
     "pretrained.model_name: /no/such/ckpt: no such directory"),
    ("pretrained", {"model_name": "{repo}/corpus.txt"}, CheckpointError,
     "pretrained.model_name: {repo}/corpus.txt: a checkpoint must be a directory, not a file"),
    ("training", {"distill_weight": 1.0, "teacher": "/no/such/teacher"}, CheckpointError,
     "training.teacher: /no/such/teacher is not a directory"),
    ("training", {"distill_weight": 1.0, "teacher": "../no-such-teacher"}, CheckpointError,
     "training.teacher: ../no-such-teacher is not a directory"),
    # train depends on its teacher in dvc.yaml, distilling or not
    ("training", {"distill_weight": 0.0, "teacher": "/no/such/teacher"}, CheckpointError,
     "training.teacher: /no/such/teacher is not a directory"),
    # in the repository, but no stage makes it
    ("training", {"distill_weight": 1.0, "teacher": "teachers/none"}, CheckpointError,
     "training.teacher: teachers/none is not a directory"),
])
def test_check_stage_refuses_a_local_path_that_is_not_there(sources, check_repo, capsys, section, values, error,
                                                           message):
    # the check stage runs first under dvc repro / exp run: a missing local source is refused
    # there, before any stage works, so dvc.lock keeps its entries (test_refusals_e2e)
    repo, main = check_repo
    main(["--params", str(_params_file(repo, tiny_params(sources)))])
    assert "every value known and in range, every local path there" in capsys.readouterr().out
    bad = _params_file(repo, tiny_params(sources), **{section: values})
    with pytest.raises(error) as refused:
        main(["--params", str(bad)])
    assert str(refused.value).startswith(message.format(repo=repo))


@pytest.mark.parametrize("section,values", [
    ("pretrained", {"use_pretrained": False, "model_name": "/no/such/ckpt"}),  # not read: random init
    ("pretrained", {"model_name": "org/ckpt"}),  # a Hub id: not fetched here
    ("dataset", {"name": "org/corpus", "tokenizer": "org/tokenizer"}),  # Hub ids: not fetched here
    # convert's output, not made yet on a first run: DVC makes it before train
    ("training", {"distill_weight": 1.0, "teacher": "models/init"}),
    ("training", {"distill_weight": 1.0, "teacher": "./models/init"}),
    ("training", {"distill_weight": 1.0, "teacher": "{repo}/models/init"}),
])
def test_check_stage_leaves_alone_what_no_stage_reads_here(sources, check_repo, section, values):
    repo, main = check_repo
    main(["--params", str(_params_file(repo, tiny_params(sources), **{section: values}))])


def test_check_stage_checks_the_sources_of_the_stages_that_will_run(sources, check_repo):
    # a clone that pulled the outputs but lacks the local sources: dvc.lock ran prepare and convert
    # with these values, so they are up to date and will not read them again; a change to any
    # value such a stage tracks (not only the path) makes it run, and its sources are checked
    repo, main = check_repo
    gone = {"dataset": {"name": "/gone/corpus", "tokenizer": "/gone/tokenizer.json"},
            "pretrained": {"model_name": "/gone/ckpt"}}
    data = tiny_params(sources)
    params = _params_file(repo, data, **gone)  # data now holds the gone paths: the values dvc.lock ran with
    converted = {f"model.{k}": v for k, v in data["model"].items() if k != "sparsity_target"}
    lock = {"schema": "2.0", "stages": {
        # check's own record (of every value) counts not: neither as a stage to run nor as a record
        "check": {"params": {"params.yaml": {"dataset": {**data["dataset"], "name": "/other"}}}},
        "prepare": {"cmd": "python stages/prepare.py", "params": {"params.yaml": {"dataset": data["dataset"]}}},
        "convert": {"cmd": "python stages/convert.py", "params": {"params.yaml": {
            "pretrained.model_name": "/gone/ckpt", "pretrained.use_pretrained": True,
            **converted, "model.norm_eps": "1e-05", "training.seed": data["training"]["seed"]}}}}}
    assert data["model"]["norm_eps"] == 1.0e-5  # as dvc.lock writes it: a string to YAML 1.1, the same number
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))

    def run(**changes):
        main(["--params", str(_params_file(repo, tiny_params(sources), **{**gone, **changes}))])

    run()
    run(training={"lr": 0.5})  # only train runs
    for changes, error, message in (
            ({"dataset": {**gone["dataset"], "train_range": [0.0, 0.5]}}, DataError, "dataset.name: /gone/corpus"),
            ({"dataset": {**gone["dataset"], "tokenizer": "/gone/t.json"}}, DataError, "dataset.name: /gone/corpus"),
            ({"training": {"seed": 7}}, CheckpointError, "pretrained.model_name: /gone/ckpt: no such directory")):
        with pytest.raises(error, match=message):
            run(**changes)
    prepared = lock["stages"].pop("prepare")  # prepare has not run (check has): it will, and read the data
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    with pytest.raises(DataError, match="dataset.name: /gone/corpus"):
        run()
    lock["stages"]["prepare"] = prepared
    lock["stages"]["convert"]["params"]["params.yaml"]["pretrained.use_pretrained"] = False  # random init then
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    with pytest.raises(CheckpointError, match="pretrained.model_name: /gone/ckpt: no such directory"):
        run()


def test_evaluate_scores_only_the_first_max_windows_windows(sources, project, tmp_path):
    # eval.max_windows 3 with batches of 2: windows 0, 1, 2 of the test split, for both models and
    # every point of the prune curve; by hand, the plain CE of full logits over those windows
    from samba.data import TokenWindows, load_split

    params = params_with(sources, eval={"max_windows": 3, "batch_size": 2, "prune_fractions": [0.0, 0.5]})
    metrics = evaluate_pipeline(params, project / "data", project / "init", project / "init", tmp_path / "eval.json",
                                tmp_path / "plots")
    L = params.training.seq_len
    windows = TokenWindows.from_numpy(load_split(project / "data", "test"), L, torch.device("cpu"))
    assert len(windows) > 4  # some are left out
    inputs, targets = windows.batch(torch.arange(3))
    model = Samba.from_pretrained(project / "init").eval()
    ppl = {}
    for fraction in (0.0, 0.5):
        model.set_sparsity(fraction)
        with torch.no_grad():
            logits = model(inputs).logits.double()
        ppl[fraction] = math.exp(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    assert metrics["protocol"]["windows"] == 3 and metrics["protocol"]["tokens"] == 3 * L
    for m in (metrics, metrics["baseline"]):
        assert m["ppl"] == pytest.approx(ppl[0.0], rel=1e-5)
        assert m["prune_curve"]["0.5"]["ppl"] == pytest.approx(ppl[0.5], rel=1e-5)
