"""The real DVC pipeline, offline, in a temporary git repository: dvc repro, dvc exp run -S,
dvc metrics diff. A tiny generated Mamba checkpoint, tokenizer and corpus stand in for the Hub."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_transformers_mamba

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

WORDS = ("the cat sat on a mat and dog ran to big red house in town where people live with many "
         "trees near old river under bright sky").split()


def make_corpus(directory: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for split, lines in (("train", 600), ("validation", 80), ("test", 80)):
        text = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + " .\n"
                       for _ in range(lines))
        (directory / f"{split}.txt").write_text(text)
    return directory


def make_tokenizer(corpus: Path, directory: Path, vocab_size: int = 200) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus / "train.txt")],
              trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def make_sources(root: Path) -> Path:
    """Everything the pipeline reads, generated: corpus/, tokenizer/, mamba/ (transformers format)."""
    make_corpus(root / "corpus")
    make_tokenizer(root / "corpus", root / "tokenizer")
    make_transformers_mamba(vocab_size=264).save_pretrained(root / "mamba")
    return root


def tiny_params(sources: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(name=str(sources / "corpus"), tokenizer=str(sources / "tokenizer"))
    params["pretrained"].update(model_name=str(sources / "mamba"))
    params["model"].update(vocab_size=264, d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8,
                           readout_stride=2)
    params["training"].update(batch_size=4, seq_len=32, epochs=1, max_steps=30, lr=1.0e-2,
                              warmup_steps=2, log_every=5, eval_every=10, eval_batches=2)
    params["compute"].update(device="cpu")
    return params


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    sources = make_sources(tmp_path_factory.mktemp("sources"))
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(sources), sort_keys=False))
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "ci@example.com", cwd=repo)
    sh("git", "config", "user.name", "CI", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    return repo


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def test_repro_exp_run_and_metrics_diff(pipeline_repo):
    repo, dvc = pipeline_repo, _dvc()
    sh(dvc, "repro", cwd=repo)
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("ppl", "loss", "readout_ppl", "readout_loss"):
        assert metrics[key] > 1.0 if key.endswith("ppl") else metrics[key] > 0, key
    assert abs(metrics["ppl"] - 2.718281828 ** metrics["loss"]) < 1e-6 * metrics["ppl"]
    for part in (metrics["sparsity"], metrics["baseline"]["sparsity"]):
        assert set(part) == {"l0", "near_zero", "near_zero_rel", "per_chunk"}
        assert set(part["per_chunk"]) == {"0", "1"}
    test_tokens = json.loads((repo / "data/tokenized/meta.json").read_text())["tokens"]["test"]
    assert metrics["protocol"]["windows"] == (test_tokens - 1) // 32
    assert metrics["protocol"]["tokens"] == metrics["protocol"]["windows"] * 32
    assert (repo / "models/samba/model.safetensors").is_file()
    assert (repo / "metrics/train/metrics.json").is_file()
    assert (repo / "metrics/plots/magnitude_histogram.png").is_file()
    # dvclive must not have written a dvc.yaml of its own
    assert not list((repo / "metrics").rglob("dvc.yaml"))

    # a second repro has nothing to do
    again = sh(dvc, "repro", cwd=repo)
    assert again.count("didn't change, skipping") == 4 and "Running stage" not in again
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline run", cwd=repo)

    # an experiment with a much stronger pruning term gives another result
    sh(dvc, "exp", "run", "-S", "training.pruning_weight=20.0", "-n", "strong-pruning", cwd=repo)
    shown = json.loads(sh(dvc, "exp", "show", "--json", cwd=repo))
    exp_metrics = _experiment_metrics(shown, "strong-pruning")
    assert exp_metrics["sparsity"]["near_zero"] > metrics["sparsity"]["near_zero"]
    assert exp_metrics["ppl"] != metrics["ppl"]

    # carried to a commit, dvc metrics diff between the two commits shows the change
    sh(dvc, "exp", "apply", "strong-pruning", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "strong pruning", cwd=repo)
    diff = json.loads(sh(dvc, "metrics", "diff", "HEAD~1", "HEAD", "--json", cwd=repo))
    eval_diff = diff["metrics/eval.json"]
    assert eval_diff["sparsity.near_zero"]["diff"] > 0
    assert eval_diff["ppl"]["old"] == pytest.approx(metrics["ppl"])
    # and the plots compare across the two commits
    plots = json.loads(sh(dvc, "plots", "diff", "HEAD~1", "HEAD", "--json", cwd=repo))
    assert not plots.get("errors")
    assert "metrics/train/plots/metrics/val/ppl.tsv" in plots["data"]
    assert any(k.startswith("Chunk-output magnitudes") for k in plots["data"])


def test_queued_sweep_runs(pipeline_repo):
    # dvc exp run --queue -S ...=a,b then dvc queue start -j 1 (after the test above)
    repo, dvc = pipeline_repo, _dvc()
    sh(dvc, "exp", "run", "--queue", "-S", "training.pruning_weight=0.01,2.0", cwd=repo)
    sh(dvc, "queue", "start", "-j", "1", cwd=repo)

    deadline = time.time() + 300
    while time.time() < deadline:
        status = sh(dvc, "queue", "status", cwd=repo)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    swept = {}
    for rev in _experiment_revs(json.loads(sh(dvc, "exp", "show", "--json", cwd=repo))):
        weight = rev["data"]["params"]["params.yaml"]["data"]["training"]["pruning_weight"]
        metrics = rev["data"].get("metrics", {}).get("metrics/eval.json", {}).get("data")
        if weight in (0.01, 2.0) and metrics:
            swept[weight] = metrics["sparsity"]["near_zero"]
    assert set(swept) == {0.01, 2.0}
    assert swept[2.0] > swept[0.01]  # the stronger L1 term gives more near-zero outputs


def _experiment_revs(shown: list):
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            yield from exp.get("revs", [])


def _experiment_metrics(shown: list, name: str) -> dict:
    for rev in _experiment_revs(shown):
        if rev.get("name") == name:
            return rev["data"]["metrics"]["metrics/eval.json"]["data"]
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(shown)[:2000]}")
