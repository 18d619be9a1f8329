"""Relative local paths in params.yaml, read from the user's repository in DVC's experiment
workspaces (the real `dvc exp run --temp` is in test_hub_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from samba.config import DatasetConfig
from samba.data import DataError, read_split_lines
from samba.paths import experiment_origin, resolve_local_path


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """tmp/repo, a DVC experiment's workspace in it as DVC lays them out, the current directory;
    tmp/shared beside the repository; repo/untracked only in the user's repository; inside/ in both."""
    repo = tmp_path / "repo"
    ws = repo / ".dvc/tmp/exps/standalone/tmpabc123"
    for d in (ws / "inside", repo / "inside", repo / "untracked", tmp_path / "shared"):
        d.mkdir(parents=True)
    monkeypatch.chdir(ws)
    return ws


def test_paths_in_an_experiment_workspace(workspace):
    repo = workspace.parents[4]
    assert experiment_origin() == repo
    assert resolve_local_path("../shared") == repo / "../shared"  # not .dvc/tmp/exps/standalone/shared
    assert resolve_local_path("../shared").resolve() == repo.parent / "shared"
    assert resolve_local_path("inside") == Path("inside")  # the experiment's own copy
    assert resolve_local_path("./untracked") == repo / "untracked"  # not copied into the workspace
    assert resolve_local_path(str(repo.parent / "shared")) == repo.parent / "shared"
    assert resolve_local_path("wikitext") == repo / "wikitext"  # a Hub id stays a path that is not there
    assert not resolve_local_path("wikitext").exists()


def test_paths_elsewhere_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiment_origin() is None
    assert resolve_local_path("../shared") == Path("../shared")
    assert resolve_local_path("~/x") == Path.home() / "x"
    # the innermost workspace counts: a repository checked out inside another's workspace
    outer = tmp_path / "a/.dvc/tmp/exps/t1/b/.dvc/tmp/exps/t2/sub"
    assert experiment_origin(outer) == tmp_path / "a/.dvc/tmp/exps/t1/b"


def test_a_dataset_outside_the_repository_is_found_from_a_workspace(workspace, sources):
    shared = workspace.parents[5] / "shared"
    (shared / "corpus").symlink_to(sources / "corpus")
    lines, description = read_split_lines(DatasetConfig(name="../shared/corpus"))
    assert lines["test"][0] == (sources / "corpus/test.txt").read_text().splitlines(keepends=True)[0]
    assert "/repo/../shared/corpus/test.txt" in description
    with pytest.raises(DataError, match=r"dataset.name: .*/repo/\.\./shared/nowhere is not a directory"):
        read_split_lines(DatasetConfig(name="../shared/nowhere"))


def test_a_teacher_outside_the_repository_is_found_from_a_workspace(workspace):
    from samba.distill import require_teacher

    teacher = workspace.parents[5] / "shared/teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    assert require_teacher("../shared/teacher").resolve() == teacher
