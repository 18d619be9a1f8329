"""Typed configs refuse what they cannot run, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from samba.config import ConfigError, ModelConfig, Params, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_the_real_experiment():
    params = load_params(REPO / "params.yaml")
    assert params.pretrained.model_name == "state-spaces/mamba-130m-hf"
    assert params.dataset.tokenizer == "EleutherAI/gpt-neox-20b"
    assert (params.dataset.name, params.dataset.config_name) == ("wikitext", "wikitext-2-raw-v1")
    t = params.training
    # the schedule of the fresh-data sweep's best dense control (benchmarks/results/sparsity):
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
    ({"norm_eps": "1e-5"}, "model.norm_eps: must be a number, got the string '1e-5'"),
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
    (lambda d: d["training"].update(lr="5e-5"), "training.lr: .*write floats as 5.0e-5"),
    (lambda d: d["training"].update(batch_sizes=4), "unknown key.*training.batch_sizes"),
    (lambda d: d["training"].pop("seq_len"), "training.seq_len: missing"),
    (lambda d: d["compute"].update(precision="fp16"), r"compute.precision: must be one of \['auto', 'bf16', 'fp32'\]"),
    (lambda d: d["compute"].update(device="gpu"), "compute.device: must be auto, cpu, cuda or cuda:N"),
    (lambda d: d["pretrained"].update(use_pretrained="yes"), "pretrained.use_pretrained: must be true or false"),
    (lambda d: d["eval"].update(near_zero_eps=0.0), "eval.near_zero_eps: must be > 0"),
    (lambda d: d.pop("logging"), r"missing section\(s\) \['logging'\]"),
    (lambda d: d.update(extra={}), "unknown key.*extra"),
])
def test_params_file_refusals(tmp_path, edit, match):
    with pytest.raises(ConfigError, match=match):
        load_params(_params_file(tmp_path, edit))


def test_params_round_trip():
    params = load_params(REPO / "params.yaml")
    assert Params.from_dict(params.to_dict(), require_all=True) == params
