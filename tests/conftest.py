"""Shared fixtures: tiny random Mamba checkpoints in the Hub's formats, a corpus, a tokenizer
and pipeline repositories, all made on the spot (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from samba.convert import relative_error  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
# Commands the tests start (python -m samba.*, torchrun) import this checkout's src/ too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent  # the test environment's python, dvc, torchrun
WORDS = ("the cat sat on a mat and dog ran to big red house in town where people live with many "
         "trees near old river under bright sky").split()

# Tiny Mamba: 4 layers so that stride 2 gives 2 chunks; vocab not a power of two.
TINY = dict(vocab_size=96, hidden_size=16, num_hidden_layers=4, state_size=4, expand=2,
            conv_kernel=4, layer_norm_epsilon=1e-5)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its initial value (ones, zeros, aranges) so tests see real numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def make_transformers_mamba(seed: int = 0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**{**TINY, **overrides}))
    perturb_(model, seed)
    return model.eval()


def save_as_mamba_ssm(hf_model, directory: Path) -> Path:
    """The same weights in mamba-ssm's original layout: config.json + pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config
    state = {}
    for key, value in hf_model.state_dict().items():
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as torch.save keeps it
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size, "ssm_cfg": {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
                                                  "expand": cfg.expand},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    return directory


@pytest.fixture(scope="session")
def hf_mamba():
    return make_transformers_mamba()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, hf_mamba) -> Path:
    directory = tmp_path_factory.mktemp("hf_mamba")
    hf_mamba.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def mamba_ssm_checkpoint(tmp_path_factory, hf_mamba) -> Path:
    return save_as_mamba_ssm(hf_mamba, tmp_path_factory.mktemp("mamba_ssm") / "ckpt")



# ----------------------------------------------------------------------------- sources

def make_corpus(directory: Path, seed: int = 0, lines: tuple[int, int, int] = (600, 80, 80)) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for split, n in zip(("train", "validation", "test"), lines):
        text = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + " .\n"
                       for _ in range(n))
        (directory / f"{split}.txt").write_text(text)
    return directory


def wiki_corpus(directory, articles: int = 9, seed: int = 0):
    """A WikiText-shaped corpus: articles opened by ' = Title = ' lines, with sections and blank lines."""
    make_corpus(directory, seed)
    rng = random.Random(seed)
    words = (directory / "train.txt").read_text().split()
    lines = [" \n"]
    for a in range(articles):
        lines += [f" = Article {a} = \n", " \n"]
        for s in range(rng.randint(1, 3)):
            lines += [f" = = Section {s} = = \n", " \n"]
            lines += [" " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 60))) + " \n"
                      for _ in range(rng.randint(1, 4))]
    (directory / "train.txt").write_text("".join(lines))
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
    """The repository's params.yaml, pointed at the generated sources and shrunk to CPU size."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"].update(name=str(sources / "corpus"), tokenizer=str(sources / "tokenizer"))
    params["pretrained"].update(model_name=str(sources / "mamba"))
    params["model"].update(vocab_size=264, d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8,
                           readout_stride=2)
    params["training"].update(batch_size=4, seq_len=32, epochs=1, max_steps=30, lr=1.0e-2,
                              warmup_steps=2, log_every=5, eval_every=10, eval_batches=2)
    params["compute"].update(device="cpu")
    params["eval"].update(prune_fractions=[0.0, 0.5, 0.75])
    return params


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> Path:
    return make_sources(tmp_path_factory.mktemp("sources"))


def params_with(sources: Path, **sections):
    """The tiny params with some values of some sections changed, checked."""
    from samba.config import Params

    data = tiny_params(sources)
    for section, values in sections.items():
        data[section].update(values)
    return Params.from_dict(data, require_all=True)


@pytest.fixture(scope="session")
def project(sources, tmp_path_factory) -> Path:
    """data/ (the prepare stage's output) and init/ (convert's) of the tiny configuration.
    Shared: tests that change them copy them first."""
    from samba.convert import convert
    from samba.data import prepare_tokens

    root = tmp_path_factory.mktemp("project")
    params = params_with(sources)
    prepare_tokens(params.dataset, root / "data")
    convert(params, root / "init")
    return root


# ----------------------------------------------------------------------------- commands

def tool_env(**extra: str) -> dict[str, str]:
    """The environment for dvc and stage commands: this venv's python first on PATH (dvc.yaml
    says plain ``python``), offline."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def sh(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env or tool_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return sh(str(BIN / "dvc"), *args, cwd=cwd, **kwargs)


def make_pipeline_repo(root: Path, params: dict) -> Path:
    """A git + DVC repository holding a copy of this project's pipeline and code, with
    ``params`` as its params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)
    sh("git", "config", "user.name", "CI", cwd=root)
    dvc("init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")  # the project's DVC settings
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")  # and its offline plots page
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "pipeline", cwd=root)
    return root
