"""Shared fixtures: tiny random Mamba checkpoints in the Hub's formats, a corpus, a tokenizer
and pipeline repositories, all made on the spot (nothing is downloaded)."""

from __future__ import annotations

import importlib
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

def pytest_collection_modifyitems(items):
    """e2e and gpu tests belong to the slow tier too: ``pytest -m "not slow"`` is the fast one."""
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.slow)


def _tiny_samba_config():
    from samba import ModelConfig

    return ModelConfig(vocab_size=264, d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8, readout_stride=2)


TINY_SAMBA = _tiny_samba_config()
# Tiny Mamba: 4 layers so that stride 2 gives 2 chunks; vocab not a power of two.
TINY = dict(vocab_size=96, hidden_size=16, num_hidden_layers=4, state_size=4, expand=2,
            conv_kernel=4, layer_norm_epsilon=1e-5)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its initial value (ones, zeros, aranges) so tests see real numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def count_slice_calls(monkeypatch, kind: str = "nll") -> dict[str, int]:
    """Count the per-slice calls of a sliced head loss, ``kind`` nll (cross-entropy) or kl:
    'grad' (loss and d(logits), the work that builds d(hidden) and d(weight)) and 'loss' (only)."""
    module = importlib.import_module("samba.ops.linear_cross_entropy")  # the package exports the function
    calls = {"grad": 0, "loss": 0}
    for key, name in (("grad", f"_slice_{kind}_and_grad"), ("loss", f"_slice_{kind}")):
        def counted(*args, _key=key, _real=getattr(module, name)):
            calls[_key] += 1
            return _real(*args)
        monkeypatch.setattr(module, name, counted)
    return calls


def tiny_samba(target: float = 0.0, seed: int = 0):
    """A tiny Samba (2 chunks of 2 layers, vocabulary 264), weights moved off their init, in eval
    mode, with ``target`` as its sparsity."""
    from samba import Samba

    torch.manual_seed(seed)
    model = Samba(TINY_SAMBA).eval()
    perturb_(model, seed)
    model.set_sparsity_target(target)
    return model


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


def make_tokenizer(corpus: Path, directory: Path, vocab_size: int = 200, train_file: str = "train.txt") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus / train_file)],
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


def shipped_params() -> dict:
    """The params the project ships (the typed defaults, which test_config holds equal to main's
    params.yaml), as params.yaml would hold them: not the working params.yaml, which an experiment
    (dvc exp run -S) or a set-up of one's own (the README's CPU branch) changes."""
    from samba.config import Params

    return json.loads(json.dumps(Params().to_dict()))  # tuples as YAML lists


def tiny_params(sources: Path) -> dict:
    """The shipped params, pointed at the generated sources and shrunk to CPU size."""
    params = shipped_params()
    params["dataset"].update(name=str(sources / "corpus"), tokenizer=str(sources / "tokenizer"))
    params["pretrained"].update(model_name=str(sources / "mamba"))
    params["model"].update(vocab_size=264, d_model=16, n_layers=4, d_state=4, readout_hidden_dim=8,
                           readout_stride=2)
    params["training"].update(batch_size=4, seq_len=32, epochs=1, max_steps=30, lr=1.0e-2,
                              warmup_steps=2, log_every=5, eval_every=10, eval_batches=2,
                              pruning_weight=0.5, sparsity_warmup_steps=0)  # the tests' runs: penalty on, no ramp
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


# ----------------------------------------------------------------------------- a Hugging Face cache

WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def make_wikitext(directory: Path, seed: int = 0, articles: tuple[int, int, int] = (8, 2, 2)) -> Path:
    r"""Text shaped like raw WikiText: ` = Title = ` and ` = = Section = = ` lines, paragraphs
    of ` word word . `, each line set off by a blank line of one space (WikiText's " \n"); and,
    for the odd file, an empty line and a form feed inside a line."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for name, n in zip(WIKITEXT_FILES.values(), articles):
        lines = []
        for _ in range(n):
            lines += [" \n", f" = {words(2).title()} = \n", " \n"]
            for _ in range(rng.randint(1, 3)):
                lines += [f" = = {words(2).title()} = = \n", " \n"]
                for _ in range(rng.randint(1, 2)):
                    lines += [f" {words(rng.randint(8, 30))} . \n", " \n"]
        lines[0] = "\n"  # an empty line; and a form feed, where str.splitlines would split
        lines[1] = lines[1].replace(" = \n", " \x0c = \n")
        (directory / name).write_text("".join(lines), encoding="utf-8")
    return directory


def wikitext_hub_rows(path: Path) -> list[str]:
    """The rows the Hub's WikiText loader made of a raw file: one per line of the file read in
    text mode; a line of only whitespace gives "", every other line itself, newline kept."""
    with path.open(encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def add_to_hub_cache(hub_cache: Path, repo_id: str, files: Path, commit: str = "0" * 40) -> Path:
    """Put the files of ``files`` into huggingface_hub's cache layout as a model repo at
    ``commit`` (blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/main).
    huggingface_hub has no writer for its cache but downloading; the tests check it reads this."""
    import hashlib

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def make_datasets_cache(datasets_cache: Path, name: str, config_name: str, rows: dict[str, list[str]],
                        work: Path) -> None:
    """Cache ``rows`` (split -> texts) as datasets caches the Hub dataset ``name`` /
    ``config_name``, written by datasets itself: a folder named like the dataset holding parquet
    files, with a card that declares the config as the Hub's card does, loaded once into
    ``datasets_cache`` (<cache>/<name>/<config>/0.0.0/<hash>/<name>-<split>.arrow), where
    ``load_dataset(name, config_name)`` looks offline."""
    import datasets

    folder = work / name
    (folder / config_name).mkdir(parents=True)
    card = ["---", "configs:", f"- config_name: {config_name}", "  data_files:"]
    for split, texts in rows.items():
        datasets.Dataset.from_dict({"text": texts}).to_parquet(folder / config_name / f"{split}-00000-of-00001.parquet")
        card += [f"  - split: {split}", f"    path: {config_name}/{split}-*"]
    (folder / "README.md").write_text("\n".join(card + ["---", ""]))
    datasets.load_dataset(str(folder), config_name, cache_dir=str(datasets_cache))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> dict:
    """A Hugging Face home (``hf_home``: hub/ and datasets/) that holds, under the default ids of
    params.yaml, tiny stand-ins made from the local sources beside it (``local``: corpus/ with
    WikiText's raw file names, tokenizer/, mamba/): the corpus's rows as the Hub's wikitext /
    wikitext-2-raw-v1, the tokenizer as EleutherAI/gpt-neox-20b, the model as
    state-spaces/mamba-130m-hf. ``env``: the variables that point the libraries at it, offline."""
    root = tmp_path_factory.mktemp("hf_cache")
    local = root / "local"
    make_wikitext(local / "corpus")
    make_tokenizer(local / "corpus", local / "tokenizer", train_file=WIKITEXT_FILES["train"])
    make_transformers_mamba(vocab_size=264).save_pretrained(local / "mamba")
    defaults = shipped_params()
    hf_home = root / "home"
    add_to_hub_cache(hf_home / "hub", defaults["dataset"]["tokenizer"], local / "tokenizer")
    add_to_hub_cache(hf_home / "hub", defaults["pretrained"]["model_name"], local / "mamba")
    rows = {split: wikitext_hub_rows(local / "corpus" / name) for split, name in WIKITEXT_FILES.items()}
    make_datasets_cache(hf_home / "datasets", defaults["dataset"]["name"], defaults["dataset"]["config_name"],
                        rows, root / "work")
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "HF_DATASETS_CACHE": str(hf_home / "datasets"), "HF_HUB_OFFLINE": "1"}
    return {"hf_home": hf_home, "local": local, "defaults": defaults, "rows": rows, "env": env}


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
