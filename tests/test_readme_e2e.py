"""The README's CPU try-out and its sparse recipe, run as written, in a copy of the repository
beside a ``shared/data`` folder (``../shared/data`` itself where it exists, else generated files
under the same names): the CPU set-up survives ``touch params.yaml && git checkout params.yaml``
on its branch, the frontier sets the sparse run against its twin, and ``dvc exp show
--only-changed --csv`` stays readable (at most 40 columns)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import yaml

from conftest import REPO, SHARED_DATA, dvc, make_pipeline_repo, make_tokenizer, make_wikitext, sh

pytestmark = pytest.mark.e2e

SECTION = "### Try it on a CPU in a few minutes"


def readme_commands(readme: str, heading: str = SECTION) -> list[str]:
    """The shell commands of the README's section under ``heading``: its indented code blocks,
    a line ending in a backslash joined with the next."""
    section = readme.split(heading, 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.M)[0]
    commands, pending = [], ""
    for line in section.splitlines():
        if not line.startswith("    "):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(pending)
        pending = ""
    return commands


def test_the_readme_section_is_read_whole():
    commands = readme_commands((REPO / "README.md").read_text())
    assert commands[0] == "git checkout -b cpu"
    assert any(c.startswith("dvc exp run -n cpu -S dataset.name=") and c.endswith("-S eval.max_windows=32")
               for c in commands)  # the continued lines joined
    assert commands[-1].startswith("python -m samba.frontier")


def _shared(tmp_path):
    """A ``shared/data`` beside the repository: the real one, or generated files of the same names."""
    shared = tmp_path / "shared"
    if SHARED_DATA.is_dir():
        shared.symlink_to(SHARED_DATA.parent)
        return
    make_wikitext(shared / "data" / "wikitext-2-tokenized", articles=(60, 12, 12))
    make_tokenizer(shared / "data" / "wikitext-2-tokenized", shared / "data" / "tokenizers" / "gpt-neox-20b",
                   train_file="wiki.train.raw")


def test_the_cpu_tryout_and_the_sparse_recipe_as_written(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo", yaml.safe_load((REPO / "params.yaml").read_text()))
    _shared(tmp_path)
    for command in readme_commands((REPO / "README.md").read_text()):
        sh("bash", "-c", command, cwd=repo)

    # the CPU set-up is its branch's params.yaml: an experiment's -S values go, its values stay
    dvc("exp", "run", "-n", "penalty", "-S", "training.pruning_weight=0.1", cwd=repo)
    sh("bash", "-c", "touch params.yaml && git checkout params.yaml", cwd=repo)  # as docs/experiments.md says
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert (params["model"]["d_model"], params["training"]["pruning_weight"]) == (64, 0.0)
    assert sh("git", "branch", "--show-current", cwd=repo).stdout.strip() == "cpu"

    # the frontier: the committed control, the twin, top-k 0.9 against both
    table = json.loads((repo / "frontier/frontier.json").read_text())
    rows = {r["experiment"]: r for r in table["rows"]}
    assert {"cpu", "twin", "topk90"} <= set(rows)
    assert rows["topk90"]["twin_experiment"] == "twin" and rows["topk90"]["exact_zeros"] == pytest.approx(58 / 64)
    assert rows["topk90"]["best_dense_experiment"] in ("cpu", "twin") and rows["cpu"]["dense"]

    # what DVC tabulates stays readable: at most 40 columns once the params that do not change go
    shown = dvc("exp", "show", "--only-changed", "--csv", cwd=repo).stdout
    header = next(csv.reader(io.StringIO(shown)))
    assert len(header) <= 40, header
    assert "training.pruning_weight" in header and "ppl" in header
