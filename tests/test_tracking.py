"""Weights & Biases, the seed's monitor: an offline run holds the same metrics, steps and params
as dvclive (and under data parallelism only rank 0 logs: tests/test_distributed.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from samba.config import Params
from samba.convert import convert
from samba.data import prepare_tokens
from samba.train import train

from conftest import tiny_params
from wandb_log import offline_run

pytest.importorskip("wandb", reason="wandb is in requirements.txt")


def dvclive_rows(metrics_dir: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for tsv in (metrics_dir / "plots/metrics").rglob("*.tsv"):
        name = str(tsv.relative_to(metrics_dir / "plots/metrics").with_suffix(""))
        with open(tsv) as f:
            for r in csv.DictReader(f, delimiter="\t"):
                rows.setdefault(int(r["step"]), {})[name] = float(r[name.split("/")[-1]])
    return rows


@pytest.mark.slow  # starts processes (or runs long): not in the fast tier
def test_wandb_offline_run_matches_dvclive(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tiny_params(sources)
    data["logging"]["use_wandb"] = True
    data["training"].update(max_steps=20, log_every=5, eval_every=10)
    params = Params.from_dict(data, require_all=True)
    prepare_tokens(params.dataset, tmp_path / "data")
    convert(params, tmp_path / "init")
    train(params, tmp_path / "data", tmp_path / "init", tmp_path / "out", tmp_path / "metrics", tmp_path / "ckpt")
    config, history = offline_run(tmp_path)
    assert config == json.loads(json.dumps(params.to_dict()))  # the whole of params.yaml (lists, as YAML has them)
    live = dvclive_rows(tmp_path / "metrics")
    assert sorted(history) == sorted(live) == [5, 10, 15, 20]
    for step in live:
        assert set(history[step]) == set(live[step]), step
        for name, value in live[step].items():
            assert history[step][name] == pytest.approx(value, rel=1e-6), (step, name)
