"""Which tasks a task, group or tag name runs, and their configurations as an include path
defines them, read from the task files without loading any data (for ``tasks.check_sources``).

The only module that reads lm-eval's private modules (``lm_eval.tasks._index``, ``_yaml_loader``
and ``_factory``, as of lm-eval 0.4.13): an lm-eval that moves or changes them breaks this file
only.
"""

from __future__ import annotations

from pathlib import Path


def task_index(include_paths: list[Path]) -> dict:
    """name -> lm-eval's index entry, for every task, group and tag under ``include_paths``."""
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build(include_paths) if include_paths else {}


def leaf_tasks(index: dict, name: str, overrides: dict | None = None) -> list[tuple[str, dict | None]]:
    """Every task that ``name`` runs, with its configuration as the include path defines it
    (groups' overrides applied, in lm-eval's order of precedence); None where only lm-eval's
    own definition says where the data is."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    overrides = overrides or {}
    entry = index.get(name)
    if entry is None:  # lm-eval's own task (or an unknown name), perhaps with a group's overrides
        return [(name, overrides or None)]
    if entry.kind is Kind.TAG:
        return [leaf for task in sorted(entry.tags) for leaf in leaf_tasks(index, task, overrides)]
    cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
    if entry.kind is not Kind.GROUP:
        return [(name, {**cfg, **overrides})]
    return _group_leaves(index, cfg, overrides)


def _group_leaves(index: dict, cfg: dict, overrides: dict) -> list[tuple[str, dict | None]]:
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES

    shared = {**{k: v for k, v in cfg.items() if k not in GROUP_FIELD_NAMES}, **overrides}
    leaves = []
    for child in cfg.get("task") or []:
        if isinstance(child, str):
            leaves += leaf_tasks(index, child, shared)
        elif isinstance(child, dict) and "group" in child:
            leaves += _group_leaves(index, child, shared)
        elif isinstance(child, dict) and "task" in child:
            leaves += leaf_tasks(index, child["task"], {**shared, **child})
    return leaves
