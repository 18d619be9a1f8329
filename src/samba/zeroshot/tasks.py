"""lm-eval's tasks, offline: refuse before anything is loaded a task whose data cannot be read,
then load the tasks and evaluate a model on them.

Offline, a task reads local files (``dataset_path: json`` with ``dataset_kwargs.data_files``, a
relative path read from the current directory); ``benchmarks/zeroshot_tasks/`` has such tasks,
which take lm-eval's own definitions and change only where the data comes from. A task that
needs the Hugging Face Hub when the Hub cannot be reached is refused, naming the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..hub import HubUnavailableError, hub_offline_mode, hub_reachable
from ..io import write_json_atomic
from .errors import ZeroShotError
from .lm import SambaLM
from .task_index import leaf_tasks, task_index

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")  # datasets' readers of local files
OUTPUT_KEYS = ("results", "configs", "versions", "higher_is_better", "n-samples", "config")


def hub_can_serve() -> bool:
    """Whether a task may read the Hugging Face Hub: offline mode (its cache) or a reachable Hub.
    When neither, offline mode is set for this process, so that ``datasets`` (which reads it
    once, at import: call this first) never waits on retries."""
    if hub_offline_mode() or hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    return False


def _data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    files = list(files.values()) if isinstance(files, dict) else [files]
    return [str(f) for item in files for f in (item if isinstance(item, list) else [item])]


def check_sources(names: list[str], include_paths: list[Path], hub_ok: bool) -> bool:
    """Refuse, before anything is loaded, a task whose local data files are missing, or that
    needs the Hub when the Hub cannot serve it. Reads the include path only: lm-eval's own
    tasks all read the Hub. Returns whether any of lm-eval's own task definitions is used."""
    index = task_index(include_paths)
    builtin = False
    for name in names:
        for leaf, cfg in leaf_tasks(index, name):
            builtin = builtin or leaf not in index
            where = repr(name) if leaf == name else f"{name!r} (its task {leaf!r})"
            path = (cfg or {}).get("dataset_path")
            if path in LOCAL_BUILDERS:
                files = _data_files(cfg)
                if not files and not (cfg.get("dataset_kwargs") or {}).get("data_dir"):
                    raise ZeroShotError(f"task {where}: dataset_path {path} needs dataset_kwargs.data_files")
                for f in files:
                    if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                        raise ZeroShotError(f"task {where}: data file {f} not found (a relative path is read "
                                            f"from the current directory, {Path.cwd()}; the tasks of "
                                            "benchmarks/zeroshot_tasks/ read .gpu/zeroshot/, which its README "
                                            "says how to build)")
            elif path and Path(str(path)).expanduser().is_dir():
                continue
            elif not hub_ok:
                source = (f"reads {path!r}" if path else
                          "is not defined under --include-path: if it is one of lm-eval's own, it reads its data")
                raise HubUnavailableError(
                    f"task {where} {source} from the Hugging Face Hub, which cannot be reached: point a task at "
                    "local files (dataset_path: json, dataset_kwargs: {data_files: ...}) in a directory given as "
                    "--include-path (benchmarks/zeroshot_tasks/ holds such tasks), or set HF_HUB_OFFLINE=1 to "
                    "read the Hugging Face cache")
    return builtin


def load_tasks(names: list[str], include_paths: list[Path], hub_ok: bool, builtin: bool = True):
    """lm-eval's Task / Group objects for ``names`` (their data loaded), and the TaskManager.
    ``builtin``: index lm-eval's own tasks too (thousands of YAML files: seconds)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=builtin)
    objects = []
    for name in names:
        if name not in manager.all_tasks:
            raise ZeroShotError(f"task {name!r} is neither one of lm-eval's tasks nor defined under "
                                f"--include-path {[str(p) for p in include_paths]}")
        try:
            loaded = manager.load(name)
        except Exception as err:  # the data: missing from the cache, unreadable, not what the task expects
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            hint = "" if hub_ok and not hub_offline_mode() else " (the Hugging Face Hub is offline here)"
            raise ZeroShotError(f"task {name!r}: lm-eval could not load its data{hint}: "
                                f"{type(err).__name__}: {first}") from err
        objects.append(loaded["groups"][name] if name in loaded["groups"] else
                       loaded["tasks"][name] if name in loaded["tasks"] else list(loaded["tasks"].values()))
    return [o for obj in objects for o in (obj if isinstance(obj, list) else [obj])], manager


def evaluate_tasks(lm: SambaLM, names: list[str], include_paths: list[Path], hub_ok: bool,
                   limit: float | None = None, bootstrap_iters: int = 100000) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm``: its results dict (no samples)."""
    from lm_eval.evaluator import simple_evaluate

    builtin = check_sources(names, include_paths, hub_ok)
    tasks, manager = load_tasks(names, include_paths, hub_ok, builtin)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                           bootstrap_iters=bootstrap_iters, log_samples=False)


def write_results(path: str | Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    kept = {k: results[k] for k in OUTPUT_KEYS if k in results}
    write_json_atomic(path, json.loads(json.dumps(kept, default=handle_non_serializable)))
