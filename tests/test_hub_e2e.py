"""The pipeline as users run it, under DVC: on the default Hub ids, served offline from a
Hugging Face cache; and with relative local paths in a `dvc exp run --temp` workspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samba.config import Params
from samba.convert import convert
from samba.data import prepare_tokens

from conftest import dvc, make_pipeline_repo, sh, tiny_params, tool_env

pytestmark = pytest.mark.e2e
SPLITS = ("train", "validation", "test")


def assert_same_outputs(data_a: Path, init_a: Path, data_b: Path, init_b: Path) -> None:
    """Token ids and converted weights equal."""
    for split in SPLITS:
        a, b = (np.fromfile(d / f"{split}.bin", dtype=np.uint16) for d in (data_a, data_b))
        assert len(a) > 100 and np.array_equal(a, b), split
    weights_a, weights_b = load_file(init_a / "model.safetensors"), load_file(init_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_repro_on_the_default_hub_ids_from_the_cache(hf_cache, tmp_path):
    # params.yaml's own ids for the dataset, the tokenizer and the checkpoint; only the
    # architecture shrunk. Offline, and the endpoint dead besides: the cache must serve it all.
    local, defaults = hf_cache["local"], hf_cache["defaults"]
    params = tiny_params(local)
    params["dataset"] = dict(defaults["dataset"])
    params["pretrained"]["model_name"] = defaults["pretrained"]["model_name"]
    assert params["dataset"]["name"] == "wikitext" and params["pretrained"]["model_name"] == "state-spaces/mamba-130m-hf"
    repo = make_pipeline_repo(tmp_path / "repo", params)
    env = tool_env(**hf_cache["env"], HF_ENDPOINT="http://127.0.0.1:9")
    out = dvc("repro", "prepare", "convert", cwd=repo, env=env)
    assert "Running stage 'prepare'" in out.stdout and "Running stage 'convert'" in out.stdout
    meta = json.loads((repo / "data/tokenized/meta.json").read_text())
    assert meta["source"] == "hub:wikitext/wikitext-2-raw-v1" and meta["tokenizer"] == "EleutherAI/gpt-neox-20b"

    # the local route over the files the cache was made from writes the same
    local_params = Params.from_dict(tiny_params(local), require_all=True)
    prepare_tokens(local_params.dataset, tmp_path / "data")
    convert(local_params, tmp_path / "init")
    assert_same_outputs(repo / "data/tokenized", repo / "models/init", tmp_path / "data", tmp_path / "init")


def test_relative_paths_in_a_temp_experiment(sources, project, tmp_path_factory):
    # dvc exp run --temp runs the stages in <repo>/.dvc/tmp/exps/...; paths written relative to
    # the repository (../sources/corpus) must still name the files beside the repository.
    root = tmp_path_factory.mktemp("relative")
    repo_dir = root / "repo"
    (root / "sources").symlink_to(sources)
    params = tiny_params(sources)
    params["dataset"].update(name="../sources/corpus", tokenizer="../sources/tokenizer")
    params["pretrained"]["model_name"] = "../sources/mamba"
    repo = make_pipeline_repo(repo_dir, params)
    dvc("exp", "run", "--temp", "-n", "relative", "prepare", "convert", cwd=repo)
    assert not (repo / "data").exists()  # it ran elsewhere, not in the workspace
    dvc("exp", "branch", "relative", "relative-branch", cwd=repo)  # its prepare and convert outputs
    sh("git", "checkout", "-q", "relative-branch", cwd=repo)
    dvc("checkout", "prepare", "convert", cwd=repo)
    assert_same_outputs(repo / "data/tokenized", repo / "models/init", project / "data", project / "init")
    assert json.loads((repo / "data/tokenized/meta.json").read_text())["dataset"] == "../sources/corpus"
