"""Local paths named in params.yaml, read from the user's repository wherever a stage runs.

``dvc exp run --temp`` and ``--queue`` run the stages in a copy of the repository under
``<repo>/.dvc/tmp/exps/`` (DVC's scratch directory), so a relative path written for the
repository, such as ``../shared/data``, would point into that scratch directory there. Every
params value that may name a local file goes through ``resolve_local_path``: dataset.name and
dataset.tokenizer (data.py), pretrained.model_name and any other checkpoint directory
(model_files.resolve_checkpoint_dir, which ``Samba.from_pretrained`` also uses), training.teacher
(distill.require_teacher). DVC itself resolves a dvc.yaml dependency (train's
``${training.teacher}``) in the workspace, so there only a path inside the repository or an
absolute one can serve as one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
EXPERIMENT_WORKSPACES = (".dvc", "tmp", "exps")  # where DVC's --temp and --queue copies live


def written_as_path(spec: str) -> bool:
    """Written as a path (./x, ../x, /x, ~/x), so never to be taken for a Hub id."""
    return spec.startswith((".", "/", "~"))


def experiment_origin(cwd: Path | None = None) -> Path | None:
    """The user's repository when ``cwd`` is a DVC experiment's workspace (inside
    ``<repo>/.dvc/tmp/exps/``), else None. (DVC's DVC_ROOT names the same directory there.)"""
    parts = (cwd or Path.cwd()).resolve().parts
    n = len(EXPERIMENT_WORKSPACES)
    for i in range(len(parts) - n, 0, -1):  # the innermost: a repository may sit in another's
        if parts[i:i + n] == EXPERIMENT_WORKSPACES:
            return Path(*parts[:i])
    return None


def resolve_local_path(spec: str) -> Path:
    """``spec`` as a path: absolute and ``~`` paths as they are; a relative path against the
    current directory (the repository, where DVC runs the stages), except in an experiment's
    workspace, where a path that leaves the workspace (``../x``) or is not in it (an untracked
    directory) is taken from the user's repository. A path that is in the workspace is read
    there: that copy is the one the experiment's commit holds and DVC hashed.

    The result need not exist: a Hub id comes back as a relative path that is not a file."""
    path = Path(spec).expanduser()
    origin = None if path.is_absolute() else experiment_origin()
    if origin is None:
        return path
    stays_inside = Path(os.path.normpath(path)).parts[:1] != (os.pardir,)
    if stays_inside and path.exists():
        return path
    outside = origin / path
    if outside.exists():
        logger.info("%s: read from the repository %s (this is DVC's experiment workspace %s)",
                    spec, origin, Path.cwd())
    return outside
