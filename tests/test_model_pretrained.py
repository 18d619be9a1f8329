"""Samba loaded from Mamba checkpoints computes what transformers computes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from samba import Samba
from samba.config import ConfigError
from samba.model_files import CheckpointError

from conftest import relative_error

STRIDE = 2


def _hf_outputs(hf_mamba, ids):
    with torch.no_grad():
        out = hf_mamba(ids, output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (3, 37), generator=torch.Generator().manual_seed(1))


def test_logits_and_chunk_outputs_match_transformers(hf_mamba, hf_checkpoint, ids):
    model = Samba.from_pretrained(hf_checkpoint, readout_stride=STRIDE, readout_hidden_dim=8).eval()
    with torch.no_grad():
        out = model(ids)
    hf_logits, hf_hidden = _hf_outputs(hf_mamba, ids)
    n_layers = hf_mamba.config.num_hidden_layers
    # transformers: one entry per layer output, then the final-normed stream
    assert len(hf_hidden) == n_layers + 1
    assert relative_error(out.logits, hf_logits) < 1e-5
    assert len(out.chunk_outputs) == n_layers // STRIDE
    for c, chunk in enumerate(out.chunk_outputs):
        assert chunk.shape == (3, 37, 16)
        assert relative_error(chunk, hf_hidden[c * STRIDE + STRIDE - 1]) < 1e-5
    assert out.readout_logits.shape == out.logits.shape


def test_mamba_ssm_format_gives_the_same_model(hf_checkpoint, mamba_ssm_checkpoint, ids):
    torch.manual_seed(0)
    a = Samba.from_pretrained(hf_checkpoint, readout_stride=STRIDE, readout_hidden_dim=8)
    torch.manual_seed(0)
    b = Samba.from_pretrained(mamba_ssm_checkpoint, readout_stride=STRIDE, readout_hidden_dim=8)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_mamba_ssm_vocab_is_padded(hf_mamba, tmp_path):
    # mamba-ssm stores the unpadded vocabulary (50277) and pads the embedding to a multiple of 8
    from conftest import make_transformers_mamba, save_as_mamba_ssm

    hf = make_transformers_mamba(vocab_size=96)
    directory = save_as_mamba_ssm(hf, tmp_path / "ckpt")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["vocab_size"] = 93
    (directory / "config.json").write_text(json.dumps(cfg))
    assert Samba.from_pretrained(directory).config.vocab_size == 96


def test_defaults_for_readout_settings(hf_checkpoint):
    model = Samba.from_pretrained(hf_checkpoint, readout_stride=STRIDE)
    assert model.config.readout_hidden_dim == 512
    assert Samba.from_pretrained(hf_checkpoint).config.readout_stride == 4


def test_save_pretrained_round_trip(hf_checkpoint, tmp_path, ids):
    model = Samba.from_pretrained(hf_checkpoint, readout_stride=STRIDE, readout_hidden_dim=8).eval()
    model.save_pretrained(tmp_path / "samba")
    again = Samba.from_pretrained(tmp_path / "samba").eval()
    assert again.config == model.config
    with torch.no_grad():
        a, b = model(ids), again(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.readout_logits, b.readout_logits)


def test_save_pretrained_replaces_whole_directory(hf_checkpoint, tmp_path):
    model = Samba.from_pretrained(hf_checkpoint, readout_stride=STRIDE, readout_hidden_dim=8)
    target = tmp_path / "samba"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- refusals

def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(directory, edit):
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors")


def test_missing_weight_is_named(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint, tmp_path)
    _edit_weights(d, lambda w: w.pop("backbone.layers.3.mixer.A_log"))
    # named as the user's file names it, not by Samba's internal chunks.1.layers.1
    with pytest.raises(CheckpointError, match=r"missing weight\(s\) in .*ckpt: backbone\.layers\.3\.mixer\.A_log$"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_unexpected_weight_is_named(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint, tmp_path)
    _edit_weights(d, lambda w: w.__setitem__("backbone.layers.0.mixer.extra_gate", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.extra_gate"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_layer_beyond_config_is_unexpected(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint, tmp_path)
    _edit_weights(d, lambda w: w.__setitem__("backbone.layers.4.norm.weight", torch.ones(16)))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.4\.norm\.weight"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint, tmp_path)
    _edit_weights(d, lambda w: w.__setitem__("backbone.layers.1.mixer.D", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.D \(31,\) \(expected \(32,\)\)"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_untied_head_is_refused(mamba_ssm_checkpoint, tmp_path):
    d = _copy(mamba_ssm_checkpoint, tmp_path)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


@pytest.mark.parametrize("key,value,match", [
    ("model_type", "mamba2", "model_type is 'mamba2'"),
    ("model_type", "llama", "model_type is 'llama'"),
    ("use_bias", True, "use_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("time_step_rank", 7, "time_step_rank"),
])
def test_other_architectures_are_refused(hf_checkpoint, tmp_path, key, value, match):
    d = _copy(hf_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_mamba2_ssm_cfg_is_refused(mamba_ssm_checkpoint, tmp_path):
    d = _copy(mamba_ssm_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["ssm_cfg"]["layer"] = "Mamba2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ssm_cfg.layer='Mamba2'"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


class _NotATensor:
    pass


def test_pickled_code_is_refused(mamba_ssm_checkpoint, tmp_path):
    d = _copy(mamba_ssm_checkpoint, tmp_path)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["payload"] = _NotATensor()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Samba.from_pretrained(d, readout_stride=STRIDE)


def test_override_that_contradicts_checkpoint_is_refused(hf_checkpoint):
    with pytest.raises(CheckpointError, match="d_model: .* has d_model=16, but 32"):
        Samba.from_pretrained(hf_checkpoint, d_model=32)


def test_impossible_override_is_refused(hf_checkpoint):
    with pytest.raises(ConfigError, match="n_layers: 4 is not divisible by readout_stride=3"):
        Samba.from_pretrained(hf_checkpoint, readout_stride=3)
    with pytest.raises(ConfigError, match="unknown model setting"):
        Samba.from_pretrained(hf_checkpoint, readout_strid=2)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Samba.from_pretrained(tmp_path)
