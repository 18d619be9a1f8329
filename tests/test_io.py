"""Outputs get the modes the user's umask gives any new file, whatever wrote them (tempfile's
0o700 scratch directories, safetensors' 0o600 files)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from samba import ModelConfig, Samba
from samba.export import export
from samba.io import atomic_dir, atomic_file, current_umask, write_json_atomic

from conftest import make_corpus, make_tokenizer


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True)
def test_outputs_follow_the_umask(umask, tmp_path):
    assert current_umask() == umask
    make_corpus(tmp_path / "corpus")
    make_tokenizer(tmp_path / "corpus", tmp_path / "tok")
    model = Samba(ModelConfig(vocab_size=264, d_model=16, n_layers=2, d_state=4, readout_hidden_dim=8,
                              readout_stride=1))
    out = tmp_path / "out"
    model.save_pretrained(out / "model")
    model.save_pretrained(out / "model", extra_files={"tokenizer.json": tmp_path / "tok/tokenizer.json"})  # replaced
    export(out / "model", out / "hf")
    with atomic_file(out / "weights.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    write_json_atomic(out / "metrics.json", {"ppl": 1.0})
    with atomic_dir(out / "plots") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "curve.json").write_text("[]")
    paths = [out / "model", out / "hf", out / "plots"] + [p for p in out.rglob("*")]
    assert {p.name for p in paths} >= {"model.safetensors", "readout.safetensors", "tokenizer.json", "sub"}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path.relative_to(tmp_path)}: {mode:o}, not {want:o} (umask {umask:03o})"


@pytest.mark.parametrize("umask", [0o027], indirect=True)
def test_the_umask_is_read_where_there_is_no_proc(umask, monkeypatch, tmp_path):
    from samba import io

    monkeypatch.setattr(io, "PROC_STATUS", tmp_path / "no-such-file")
    assert current_umask() == umask
    assert os.umask(umask) == umask  # left as it was
