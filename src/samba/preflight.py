"""What the check stage asks of params.yaml beyond its values (config.load_params): every local
path a stage is about to read is there, refused by name before any stage works. The checks are
the stages' own (data.local_dataset_files, data.local_tokenizer_file,
model_files.local_checkpoint_dir, distill.require_teacher), none of which reads a file's contents
or reaches the Hub."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .config import Params
from .data import local_dataset_files, local_tokenizer_file
from .distill import distilling, require_teacher
from .model_files import CheckpointError, local_checkpoint_dir
from .paths import experiment_origin, resolve_local_path


def locked_values(lock: Path) -> dict[str, list]:
    """The values of params.yaml that dvc.lock says the other stages last ran with, by dotted
    key ({} without a readable dvc.lock: then every path is checked)."""
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages") or {}
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    values: dict[str, list] = {}
    for name, stage in stages.items():
        if name == "check":  # the stage that calls this: its record is of every value
            continue
        for tracked in ((stage or {}).get("params") or {}).values():
            for key, value in (tracked or {}).items():
                items = ({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
                for dotted, v in items.items():
                    values.setdefault(dotted, []).append(v)
    return values


def inside_the_repository(spec: str) -> bool:
    """A path in this repository (or in the user's, from an experiment's workspace): it may be a
    stage's output that does not exist yet; DVC checks it as a dependency."""
    path = Path(os.path.abspath(resolve_local_path(spec)))
    return any(path.is_relative_to(root) for root in (Path.cwd().resolve(), experiment_origin()) if root)


def check_local_sources(params: Params, lock: Path) -> None:
    """Every local path that a stage is about to read exists as what it must be. A source whose
    value dvc.lock says its stage last ran with is not checked: that stage is up to date and will
    not read it again (a clone that pulled the outputs but lacks ../shared/data runs on). Without a
    dvc.lock every source is checked. Hub ids are not fetched."""
    ran = locked_values(lock)

    def changed(*keys: str) -> bool:  # not recorded, or recorded with another value
        for key in keys:
            section, name = key.split(".")
            value = getattr(getattr(params, section), name)
            if not ran.get(key) or any(v != value for v in ran[key]):
                return True
        return False

    if changed("dataset.name"):
        local_dataset_files(params.dataset.name)
    if changed("dataset.tokenizer"):
        local_tokenizer_file(params.dataset.tokenizer)
    if params.pretrained.use_pretrained and changed("pretrained.model_name", "pretrained.use_pretrained"):
        try:
            local_checkpoint_dir(params.pretrained.model_name)
        except CheckpointError as err:
            raise CheckpointError(f"pretrained.model_name: {err}") from None
    # a teacher is train's dependency in dvc.yaml: whenever it is not there, train is not up to date
    if distilling(params.training) and not inside_the_repository(params.training.teacher):
        require_teacher(params.training.teacher)
