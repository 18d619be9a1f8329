"""Resumable training state: what a checkpoint holds, and when it may be resumed.

``checkpoints/train/last.pt`` is the state after ``step`` *completed* optimizer steps: the
weights, the AdamW state, every row logged so far (so that curves continue without gaps or
repeats), the keep-best record, the W&B run id, and the fingerprint of what produced it. It is
written to a temporary file and renamed into place, so a kill at any moment (even ``kill -9``
while writing) leaves the previous checkpoint whole.

A checkpoint is resumed only by the run that wrote it: same params (training, model,
pretrained, precision, backend), same code (every file of the ``samba`` package, by content),
same init weights and same token data (by content). Anything else is refused, saying what
differs, rather than silently continuing a run trained on something else.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import Params, flatten
from .io import atomic_file

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "last.pt"
BEST_FILE = "best.safetensors"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def code_digest() -> str:
    """sha256 over every Python file of the imported ``samba`` package (paths and contents)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(params: Params, data_dir: Path, init_dir: Path) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed, part by part."""
    compute = params.compute
    return {
        "params": {"training": params.training.to_dict(), "model": params.model.to_dict(),
                   "pretrained": params.pretrained.to_dict(),
                   "compute": {"precision": compute.precision, "backend": compute.backend}},
        "code": code_digest(),
        "init": {name: file_digest(init_dir / name) for name in ("config.json", "model.safetensors")},
        "data": {name: file_digest(data_dir / name)
                 for name in ("meta.json", "train.bin", "validation.bin")},
    }


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    reasons = []
    old, new = flatten(saved.get("params", {})), flatten(current["params"])
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        reasons.append("params differ (" + "; ".join(changed[:5]) + (", ..." if len(changed) > 5 else "") + ")")
    if saved.get("code") != current["code"]:
        reasons.append("the code in src/samba differs")
    if saved.get("init") != current["init"]:
        reasons.append("the init weights (models/init) differ")
    if saved.get("data") != current["data"]:
        reasons.append("the token data (data/tokenized) differ")
    return reasons


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file, then a rename."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, current: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state if ``path`` exists and was written by this same run; None if there is
    none; CheckpointError, naming what differs, if it belongs to another run."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); delete it "
                              f"(rm -r {path.parent}) to start this run from step 0") from None
    reasons = differences(state.get("fingerprint", {}), current)
    if reasons:
        raise CheckpointError(
            f"{path} was written by another run: {'; '.join(reasons)}. Delete it (rm -r {path.parent}) to "
            "start this run from step 0, or restore that run's params, code and inputs to resume it")
    return state
