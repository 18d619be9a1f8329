"""What the check stage asks of params.yaml beyond its values (config.load_params): every local
path a stage is about to read is there, refused by name before any stage works. The checks are
the stages' own (data.local_dataset_files, data.local_tokenizer_file,
model_files.local_checkpoint_dir, distill.require_teacher), none of which reads a file's contents
or reaches the Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import Params, flatten, float_literal
from .data import local_dataset_files, local_tokenizer_file
from .distill import require_teacher
from .model_files import CheckpointError, local_checkpoint_dir
from .paths import experiment_origin, resolve_local_path


def _number(value: Any) -> Any:
    """5e-05 as dvc.lock holds it (a string to YAML 1.1) and as params.yaml gives it, alike; a
    tuple as the list dvc.lock holds."""
    if isinstance(value, (list, tuple)):
        return [_number(v) for v in value]
    return float_literal(value)


_ABSENT = object()  # a recorded key params.yaml no longer has: its stage runs again


def params_to_be_read(params: Params, lock: Path) -> set[str] | None:
    """The params (dotted keys) that the stages DVC is about to run read: those each stage of
    dvc.lock recorded, for the stages whose recorded values differ from ``params``, and those no
    stage recorded yet (a stage that has not run). None without a readable dvc.lock (a first run:
    every stage runs). The check stage's own record, of every value, tells nothing of the others."""
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    current = {k: _number(v) for k, v in flatten(params.to_dict()).items()}
    recorded = [{k: _number(v) for tracked in ((stage or {}).get("params") or {}).values()
                 for k, v in flatten(tracked).items()}
                for name, stage in stages.items() if name != "check"]
    read = set(current).difference(*recorded)
    for values in recorded:
        if any(current.get(k, _ABSENT) != v for k, v in values.items()):
            read |= values.keys()
    return read


def stage_outputs(dvc_yaml: Path) -> list[Path]:
    """The outputs dvc.yaml declares (a teacher may be one that is not made yet)."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return []
    return [Path(os.path.normpath(next(iter(out)) if isinstance(out, dict) else out))
            for stage in stages.values() for out in (stage or {}).get("outs") or []]


def _repository_path(spec: str, root: Path) -> Path | None:
    """``spec`` relative to the repository ``root`` (or the user's, from an experiment's
    workspace), None if it lies outside."""
    path = Path(os.path.abspath(resolve_local_path(spec)))
    for base in (root.resolve(), experiment_origin()):
        if base and path.is_relative_to(base):
            return path.relative_to(base)
    return None


def check_local_sources(params: Params, repo: Path) -> None:
    """Every local path that a stage is about to read exists as what it must be. dvc.lock says
    which stages will run again (``params_to_be_read``): a source only an up-to-date stage reads is
    not checked (a clone that pulled the outputs but lacks ../shared/data runs on).
    Without a dvc.lock every source is checked. Hub ids are not fetched."""
    to_be_read = params_to_be_read(params, repo / "dvc.lock")

    def read(key: str) -> bool:
        return to_be_read is None or key in to_be_read

    if read("dataset.name"):
        local_dataset_files(params.dataset.name)
    if read("dataset.tokenizer"):
        local_tokenizer_file(params.dataset.tokenizer)
    if params.pretrained.use_pretrained and read("pretrained.model_name"):
        try:
            local_checkpoint_dir(params.pretrained.model_name)
        except CheckpointError as err:
            raise CheckpointError(f"pretrained.model_name: {err}") from None
    # the teacher is train's dependency in dvc.yaml, distilling or not: DVC needs it there; one
    # in the repository may be a stage's output not made yet
    teacher = params.training.teacher
    inside = _repository_path(teacher, repo)
    if inside is None or not any(inside.is_relative_to(out) for out in stage_outputs(repo / "dvc.yaml")):
        require_teacher(teacher)
