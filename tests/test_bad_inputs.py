"""Every bad input of docs/failures.md's table "When something is wrong", one test per row: the stage,
run as a user runs it, exits with code 2, its whole stderr is one line naming the problem in
the user's terms, and it leaves the outputs of an earlier run untouched."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from samba.config import Params
from samba.convert import convert

from conftest import REPO, make_transformers_mamba, save_as_mamba_ssm, tiny_params, tool_env

pytestmark = pytest.mark.slow  # each case starts a stage's process


@dataclass
class Case:
    stage: str
    message: str  # a regular expression the one error line must match
    edit: Callable[[dict, Path], None] = lambda params, tmp: None  # params.yaml (as a dict) and tmp dir
    args: Callable[[Path], dict] = field(default=lambda tmp: {})  # --option overrides
    env: dict = field(default_factory=dict)  # environment variables set for the run


def _set(section: str, **values):
    return lambda p, tmp: p[section].update(values)


def _model_source(make: Callable[[Path], None]):
    """pretrained.model_name pointed at a checkpoint that ``make`` spoils."""
    def edit(params, tmp):
        src = tmp / "bad_ckpt"
        make(src)
        params["pretrained"]["model_name"] = str(src)
    return edit


def _hf_checkpoint(tmp: Path) -> Path:
    make_transformers_mamba(vocab_size=264).save_pretrained(tmp)
    return tmp


def _drop_weight(src: Path):
    _hf_checkpoint(src)
    w = load_file(src / "model.safetensors")
    w.pop("backbone.layers.1.mixer.dt_proj.bias")
    save_file(w, src / "model.safetensors")


def _extra_weight(src: Path):
    _hf_checkpoint(src)
    w = load_file(src / "model.safetensors")
    w["backbone.layers.0.mixer.gate.weight"] = torch.zeros(2)
    save_file(w, src / "model.safetensors")


def _truncate_safetensors(src: Path):
    _hf_checkpoint(src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_bin(src: Path):
    save_as_mamba_ssm(make_transformers_mamba(vocab_size=264), src)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[:100] + b"\0" * 100 + data[200:len(data) // 2])


def _other_architecture(src: Path):
    _hf_checkpoint(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))


def _corpus(edit_split: Callable[[Path], None]):
    def edit(params, tmp):
        corpus = tmp / "corpus"
        shutil.copytree(params["dataset"]["name"], corpus)
        edit_split(corpus)
        params["dataset"]["name"] = str(corpus)
    return edit


def _small_vocab_model(params, tmp):
    # a model whose embedding is smaller than the tokenizer the data was made with (256 ids)
    params["model"]["vocab_size"] = 200
    params["pretrained"]["use_pretrained"] = False


def _short_test_split(tmp: Path) -> dict:
    data = tmp / "short_data"
    shutil.copytree(tmp / "project/data", data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "test.bin").write_bytes((data / "test.bin").read_bytes()[:2 * 20])  # 20 tokens < seq_len + 1
    meta["tokens"]["test"] = 20
    (data / "meta.json").write_text(json.dumps(meta))
    return {"--data": str(data)}


def _short_validation_split(tmp: Path) -> dict:
    data = tmp / "short_val"
    shutil.copytree(tmp / "project/data", data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "validation.bin").write_bytes((data / "validation.bin").read_bytes()[:2 * 20])
    meta["tokens"]["validation"] = 20
    (data / "meta.json").write_text(json.dumps(meta))
    return {"--data": str(data)}


# docs/failures.md's table, row for row.
CASES = {
    "malformed YAML": Case("prepare", r"params.yaml: not valid YAML at line 2, column 6: expected ',' or '\]', but got "
                                      r"':' \(while parsing a flow sequence started at line 1, column 11\)$",
                           edit=lambda p, tmp: p.update({"__raw__": "training: [1, 2\nmodel: {"})),
    "unknown key": Case("prepare", r"unknown key\(s\) training.batch_sizes; did you mean training.batch_size\? "
                                   r"known keys of training: \['batch_size', .*\]$",
                        edit=_set("training", batch_sizes=4)),
    "missing key": Case("prepare", r"training.seq_len: missing", edit=lambda p, tmp: p["training"].pop("seq_len")),
    "mistyped key": Case("train", r"training.lr: must be a number, got the string '1e-4,'$",
                         edit=_set("training", lr="1e-4,")),
    "out-of-range key": Case("train", r"training.lr: must be > 0, got -1.0", edit=_set("training", lr=-1.0)),
    "sparsity target of 1": Case("train", r"model.sparsity_target: must be in \[0, 1\)",
                                 edit=_set("model", sparsity_target=1.0)),
    "negative sparsity target": Case("train", r"model.sparsity_target: must be in \[0, 1\)",
                                     edit=_set("model", sparsity_target=-0.5)),
    "unknown penalty": Case("train", r"training.pruning_penalty: must be one of \['l1', 'hoyer'\], got 'l0'",
                            edit=_set("training", pruning_penalty="l0")),
    "missing split": Case("prepare", r"has no validation split",
                          edit=_corpus(lambda c: (c / "validation.txt").unlink())),
    "empty split": Case("prepare", r"the test split is empty after tokenization",
                        edit=_corpus(lambda c: (c / "test.txt").write_text(""))),
    "test split shorter than one window": Case("evaluate", r"the test split has 20 tokens: not one window of "
                                               r"training.seq_len \+ 1 = 33 tokens", args=_short_test_split),
    "validation split shorter than one window": Case("train", r"the validation split has 20 tokens: not one window",
                                                     args=_short_validation_split),
    "tokenizer larger than the model's vocabulary": Case(
        "train", r"model.vocab_size is 200 but the tokenizer .* has 256 tokens", edit=_small_vocab_model,
        args=lambda tmp: {"--init": str(tmp / "small_init")}),
    "checkpoint of another architecture": Case("convert", r"model_type is 'llama'; only Mamba-1",
                                               edit=_model_source(_other_architecture)),
    "missing weight": Case("convert", r"missing weight\(s\) in .*bad_ckpt: backbone.layers.1.mixer.dt_proj.bias$",
                           edit=_model_source(_drop_weight)),
    "unexpected weight": Case("convert", r"unexpected weight\(s\) in .*bad_ckpt: backbone.layers.0.mixer.gate.weight$",
                              edit=_model_source(_extra_weight)),
    "truncated model.safetensors": Case("convert", r"model.safetensors: not a readable safetensors file, truncated "
                                                   r"or corrupt", edit=_model_source(_truncate_safetensors)),
    "corrupt pytorch_model.bin": Case("convert", r"pytorch_model.bin: cannot be read as a PyTorch checkpoint, "
                                                 r"truncated or corrupt", edit=_model_source(_corrupt_bin)),
    "unwritable output directory": Case("prepare", r"/proc/samba/tokenized: cannot write there",
                                        args=lambda tmp: {"--out": "/proc/samba/tokenized"}),
    "compute.device: cuda without CUDA": Case("train", r"compute.device: CUDA was asked for but torch sees no GPU",
                                              edit=_set("compute", device="cuda")),
    "more processes than GPUs": Case("train", r"compute.num_processes: 2 but only 0 GPU\(s\) are visible",
                                     edit=_set("compute", device="cuda", num_processes=2)),
    "torchrun world size other than compute.num_processes": Case(
        "train", r"compute.num_processes: 1 but torchrun started 4 processes",
        env={"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}),
}

OUTPUTS = {"prepare": ["--out"], "convert": ["--out"], "train": ["--out", "--metrics"], "evaluate": ["--out"]}


def _argv(stage: str, params_file: Path, tmp: Path, overrides: dict) -> list[str]:
    project = tmp / "project"
    args = {"--params": str(params_file)}
    args.update({"prepare": {"--out": str(tmp / "out/tokenized")},
                 "convert": {"--out": str(tmp / "out/init")},
                 "train": {"--data": str(project / "data"), "--init": str(project / "init"),
                           "--out": str(tmp / "out/samba"), "--metrics": str(tmp / "out/metrics"),
                           "--checkpoints": str(tmp / "out/ckpt")},
                 "evaluate": {"--data": str(project / "data"), "--baseline": str(project / "init"),
                              "--model": str(project / "init"), "--out": str(tmp / "out/eval.json"),
                              "--plots": str(tmp / "out/plots")}}[stage])
    args.update(overrides)
    return [x for kv in args.items() for x in kv]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_outputs_kept(name, sources, project, tmp_path):
    case = CASES[name]
    shutil.copytree(project, tmp_path / "project")
    params = tiny_params(sources)
    case.edit(params, tmp_path)
    params_file = tmp_path / "params.yaml"
    raw = params.pop("__raw__", None)
    params_file.write_text(raw if raw is not None else yaml.safe_dump(params))
    if name == "tokenizer larger than the model's vocabulary":
        convert(Params.from_dict(params, require_all=True), tmp_path / "small_init")
    argv = _argv(case.stage, params_file, tmp_path, case.args(tmp_path))
    # an earlier run's outputs, which must survive
    earlier = {}
    for option in OUTPUTS[case.stage]:
        path = Path(argv[argv.index(option) + 1])
        if str(path).startswith(str(tmp_path)):
            path.mkdir(parents=True, exist_ok=True) if path.suffix != ".json" else path.parent.mkdir(parents=True)
            marker = path / "earlier.txt" if path.suffix != ".json" else path
            marker.write_text("an earlier run's output")
            earlier[marker] = marker.read_text()
    # The stage as a user runs it, in a process of its own: its whole stderr is what they see
    # (log lines, library warnings, progress bars), and it must be the one line.
    proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{case.stage}.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, env=tool_env(**case.env))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, f"not one line:\n{proc.stderr}"
    assert proc.stderr.startswith(f"[{case.stage}] error: "), proc.stderr
    assert re.search(case.message, proc.stderr.rstrip("\n")), proc.stderr
    assert proc.stdout == "", proc.stdout
    for marker, text in earlier.items():
        assert marker.read_text() == text, f"{marker} was touched"


def test_a_message_over_several_lines_is_printed_as_one(capsys):
    from samba.cli import run_stage
    from samba.errors import UserError

    def main():
        raise UserError("could not fetch it: 404 Client Error.\n\n  Repository Not Found for url: x\n")

    with pytest.raises(SystemExit) as exit_info:
        run_stage("stage", main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "[stage] error: could not fetch it: 404 Client Error. Repository Not Found for url: x\n"
