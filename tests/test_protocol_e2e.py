"""The fresh-data protocol as a user runs it, with dvc exp run: a stand-in pretrained on one part
of the train split, then a sparse fine-tune on the unseen rest, distilled from a teacher given
as a path (a dependency of train: a changed teacher reruns the stage)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import dvc, make_pipeline_repo, make_tokenizer, tiny_params, wiki_corpus

pytestmark = pytest.mark.e2e


def test_standin_on_one_part_then_a_distilled_fine_tune_on_the_rest(tmp_path):
    corpus = wiki_corpus(tmp_path / "corpus", articles=12)
    make_tokenizer(corpus, tmp_path / "tokenizer")
    params = tiny_params(tmp_path)
    params["dataset"].update(name=str(corpus), tokenizer=str(tmp_path / "tokenizer"))
    params["pretrained"]["use_pretrained"] = False
    params["training"].update(max_steps=12, eval_every=6)
    repo = make_pipeline_repo(tmp_path / "repo", params)

    # 1. the stand-in: random init, the first half of the train split
    dvc("exp", "run", "-n", "standin", "-S", "dataset.train_range=[0.0,0.5]", cwd=repo)
    first = np.fromfile(repo / "data/tokenized/train.bin", dtype=np.uint16)
    standin = tmp_path / "standin"
    shutil.copytree(repo / "models/samba", standin)
    standin_ppl = json.loads((repo / "metrics/eval.json").read_text())["ppl"]

    # 2. the fine-tune: from the stand-in, on the unseen second half, top-k, distilled from it
    dvc("exp", "run", "-n", "fine", "-S", "dataset.train_range=[0.5,1.0]", "-S", "pretrained.use_pretrained=true",
        "-S", f"pretrained.model_name={standin}", "-S", "model.sparsity_target=0.5",
        "-S", "training.distill_weight=1.0", "-S", f"training.teacher={standin}", cwd=repo)
    second = np.fromfile(repo / "data/tokenized/train.bin", dtype=np.uint16)
    meta = json.loads((repo / "data/tokenized/meta.json").read_text())
    assert meta["train_range"]["tokens"] == [len(first), len(first) + len(second)]  # the unseen rest, all of it
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["baseline"]["ppl"] == pytest.approx(standin_ppl, rel=1e-6)  # the baseline is the stand-in
    assert metrics["sparsity"]["l0"] >= 0.5
    assert (repo / "metrics/train/plots/metrics/train/distill.tsv").is_file()
    lock = (repo / "dvc.lock").read_text()
    assert str(standin) in lock  # the teacher is a dependency of train, hashed

    # 3. a changed teacher reruns train (and only what follows it)
    config = standin / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = json.loads(dvc("status", "--json", cwd=repo).stdout)
    assert "train" in changed and "prepare" not in changed and "convert" not in changed
