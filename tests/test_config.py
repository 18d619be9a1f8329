"""Typed configs refuse what they cannot run, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from samba.config import ConfigError, EvalConfig, ModelConfig, Params, TrainingConfig, flatten, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_the_real_experiment():
    # On main, params.yaml is the real experiment and the typed defaults mirror it. On a branch of
    # one's own whose params.yaml holds a set-up (the README's CPU try-out), this test says so.
    params = load_params(REPO / "params.yaml")
    if params != Params():
        changed = {k: v for k, v in flatten(params.to_dict()).items() if flatten(Params().to_dict())[k] != v}
        pytest.fail(f"params.yaml is not the shipped experiment (Params()): {sorted(changed)} differ. Expected on a "
                    "branch that commits a set-up of its own (the README's CPU try-out); on main, params.yaml and "
                    "src/samba/config.py disagree")
    assert params.pretrained.model_name == "state-spaces/mamba-130m-hf"
    assert params.dataset.tokenizer == "EleutherAI/gpt-neox-20b"
    assert (params.dataset.name, params.dataset.config_name) == ("wikitext", "wikitext-2-raw-v1")
    t = params.training
    # the schedule of the fresh-data sweeps' dense control (benchmarks/results/sparsity, 2026-11-30/sparsity_sweep):
    # 3 epochs at lr 1e-4, warm-up 30; no penalty, no top-k, no teacher: the default run is that
    # control, the teacher of the sparse recipe
    assert (t.readout_weight, t.lr, t.batch_size, t.seq_len, t.epochs, t.warmup_steps) == (0.5, 1.0e-4, 16, 512, 3, 30)
    assert (t.pruning_penalty, t.pruning_weight, t.distill_weight, t.sparsity_warmup_steps) == ("hoyer", 0.0, 0.0, 100)
    assert params.model == ModelConfig() and params.model.sparsity_target == 0  # 130m shape, stride 4, readout 512
    assert params == Params()  # the typed config's defaults are params.yaml's


@pytest.mark.parametrize("data,match", [
    ({"n_layers": 10, "readout_stride": 4}, "n_layers: 10 is not divisible by readout_stride=4"),
    ({"d_model": 0}, "d_model: must be a positive integer"),
    ({"d_state": -3}, "d_state: must be a positive integer"),
    ({"d_model": "768"}, "model.d_model: must be an integer"),
    ({"d_model": 7.5}, "model.d_model: must be an integer"),
    ({"expand_factor": True}, "model.expand_factor: must be an integer"),
    ({"norm_eps": "1e-5x"}, "model.norm_eps: must be a number, got the string '1e-5x'"),
    ({"readout_strides": 4}, "unknown key.*model.readout_strides"),
])
def test_model_config_refusals(data, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(data, prefix="model")


def _params_file(tmp_path, edit):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["training"].update(lr=-1.0), "training.lr: must be > 0"),
    (lambda d: d["training"].update(lr="1e-4,"), "training.lr: must be a number, got the string '1e-4,'"),
    (lambda d: d["eval"].update(max_ppl_increase=float("inf")),
     "eval.max_ppl_increase: must be a finite number, got inf"),
    (lambda d: d["training"].update(batch_sizes=4), "unknown key.*training.batch_sizes"),
    (lambda d: d["training"].pop("seq_len"), "training.seq_len: missing"),
    (lambda d: d["compute"].update(precision="fp16"), r"compute.precision: must be one of \['auto', 'bf16', 'fp32'\]"),
    (lambda d: d["compute"].update(device="gpu"), "compute.device: must be auto, cpu, cuda or cuda:N"),
    (lambda d: d["pretrained"].update(use_pretrained="yes"), "pretrained.use_pretrained: must be true or false"),
    (lambda d: d["eval"].update(near_zero_eps=0.0), "eval.near_zero_eps: must be > 0"),
    (lambda d: d.pop("logging"), r"missing section\(s\) \['logging'\]"),
    (lambda d: d.update(extra={}), "unknown key.*extra"),
    (lambda d: d.update(trainig=d.pop("training")), r"unknown key\(s\) trainig; did you mean training\? known keys"),
])
def test_params_file_refusals(tmp_path, edit, match):
    with pytest.raises(ConfigError, match=match):
        load_params(_params_file(tmp_path, edit))


def test_params_round_trip():
    params = load_params(REPO / "params.yaml")
    assert Params.from_dict(params.to_dict(), require_all=True) == params


# ----------------------------------------------------------------------------- values as typed

@pytest.mark.parametrize("text,value", [("5e-05", 5e-5), ("1E-4", 1e-4), ("3.0e-4", 3e-4), ("1e-4", 1e-4),
                                        (".5", 0.5), ("2", 2.0), ("+1.5e+2", 150.0)])
def test_a_string_that_is_exactly_a_float_literal_is_that_float(text, value):
    assert TrainingConfig.from_dict({"lr": text}, "training").lr == value
    assert EvalConfig.from_dict({"prune_fractions": ["0", "1e-05"]}).prune_fractions == (0.0, 1e-5)  # list items too


@pytest.mark.parametrize("value,message", [
    # float() takes these; a learning rate never is one: refused, naming the key
    ("nan", "training.lr: must be a number, got the string 'nan'"),
    ("inf", "training.lr: must be a number, got the string 'inf'"),
    ("-Infinity", "training.lr: must be a number, got the string '-Infinity'"),
    ("1_000", "training.lr: must be a number, got the string '1_000'"),
    (" 5e-5", "training.lr: must be a number, got the string ' 5e-5'"),
    ("0x1p-3", "training.lr: must be a number, got the string '0x1p-3'"),
    ("true", "training.lr: must be a number, got the string 'true'"),
    (True, r"training.lr: must be a number, got True \(bool\)"),
    ("1e999", "training.lr: must be a finite number, got '1e999'"),
    (float("nan"), "training.lr: must be a finite number, got nan"),  # YAML's .nan
    (float("-inf"), "training.lr: must be a finite number, got -inf"),
    ("-5e-5", "training.lr: must be > 0, got -5e-05"),  # a literal, then the range check
])
def test_other_strings_booleans_and_non_finite_numbers_are_refused_by_name(value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        TrainingConfig.from_dict({"lr": value}, "training")


def test_a_params_file_as_dvc_exp_run_writes_it_loads(tmp_path):
    """dvc exp run -S training.lr=5e-5 writes 'lr: 5e-05' (DVC's own writer, used here), a string
    to YAML 1.1: load_params reads the float."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, ["training.lr=5e-5", "model.norm_eps=1e-6", "eval.prune_fractions=[0.0,1e-5]"])
    text = path.read_text()
    assert "  lr: 5e-05\n" in text and yaml.safe_load(text)["training"]["lr"] == "5e-05"
    params = load_params(path)
    assert (params.training.lr, params.model.norm_eps, params.eval.prune_fractions) == (5e-5, 1e-6, (0.0, 1e-5))
    assert params.training == TrainingConfig(lr=5e-5)  # nothing else moved


@pytest.mark.parametrize("data,message", [
    ({"pruning_weigth": 0.5}, r"unknown key\(s\) training.pruning_weigth; did you mean training.pruning_weight\? "
                              r"known keys of training: \['batch_size', .*'pruning_weight', .*\]$"),
    ({"batch_sizes": 4, "lrr": 1.0}, r"unknown key\(s\) training.batch_sizes, training.lrr; did you mean "
                                     r"training.batch_size for training.batch_sizes, training.lr for training.lrr\? "
                                     r"known keys of training: \[.*\]$"),
    ({"learning_rate": 1e-4}, r"unknown key\(s\) training.learning_rate; known keys of training: \[.*\]$"),
])
def test_an_unknown_key_says_the_nearest_known_one_first_then_all(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        TrainingConfig.from_dict(data, "training")
    assert all(f"'{name}'" in str(err.value) for name in TrainingConfig.__dataclass_fields__)
