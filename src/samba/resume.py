"""Resumable training state: what a checkpoint holds, and when it may be resumed.

``checkpoints/train/last.pt`` is the state after ``step`` *completed* optimizer steps: the
weights, the AdamW state, every row logged so far (so that curves continue without gaps or
repeats), the keep-best record, the W&B run id, and the fingerprint of what produced it. It is
written to a temporary file and renamed into place, so a kill at any moment (even ``kill -9``
while writing) leaves the previous checkpoint whole. Beside it: ``best.safetensors`` (keep:
best) and ``dvclive/``, the metrics of the run so far, which replace the stage's metrics
directory whole only when the run completes.

A checkpoint is resumed only by a run on the same trajectory (the same weights after every
step, the same weights kept). Its fingerprint holds exactly what decides that: the params of
``trajectory_params``, the code (every file of the ``samba`` package, by content) and the
files the run reads (``INPUTS``, by content: the init weights, the token data, and the
teacher's weights when distilling). Everything else (compute.device, num_processes,
cuda_graphs, compile, backend; eval.*; logging.*; training.log_every, checkpoint_every, and
eval_every, eval_batches unless keep: best) may change across a resume, and the run continues
the same trajectory up to floating-point rounding. A checkpoint of another run, or one that cannot be read, is set aside under a name
the log gives (``other-run-<when>-step<N>.pt``, never overwriting one), and the run starts
afresh: nothing is deleted, nothing blocks the stage.

``Checkpointer`` is a run's use of all this, as torchtitan's ``checkpointer``: it resumes, saves,
keeps the best weights, and when the run completes publishes the metrics and clears the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .config import Params, flatten
from .io import atomic_dir, atomic_file

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "last.pt"
BEST_FILE = "best.safetensors"
LIVE_DIR = "dvclive"

# Training values that decide only what is logged and when, never the weights.
LOGGING_ONLY = ("training.log_every", "training.checkpoint_every")
# Validation picks the weights kept under keep: best; under keep: last it only logs.
VALIDATION = ("training.eval_every", "training.eval_batches")
# Params that name files: the files count (INPUTS), not where they are.
NAMES_OF_INPUTS = ("training.teacher",)
# The files a run reads, by input (the directory is the caller's; None: every file in it):
# what they hold is the trajectory's starting point, its data and its teacher.
INPUTS = {
    "init": ("the init weights", ("config.json", "model.safetensors")),
    "data": ("the token data", ("meta.json", "train.bin", "validation.bin")),
    "teacher": ("the teacher's weights", None),  # any checkpoint format: every file
}
# How an optimizer runs rather than what it computes: its own, whatever the checkpoint's was.
OPTIMIZER_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def code_digest(root: Path | None = None) -> str:
    """sha256 over every Python file of the imported ``samba`` package (paths and contents), or
    of the package directory ``root``."""
    root = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def trajectory_params(params: Params, precision: str) -> dict[str, Any]:
    """The params that decide the weights after every step and the weights kept, flat
    ("training.lr": ...): every training value but the logging cadence and the teacher's path
    (a new one counts by default), the model section, pretrained.freeze_backbone, and the
    precision as resolved on the device ("bf16" or "fp32", never "auto")."""
    values = flatten({"training": params.training.to_dict(), "model": params.model.to_dict()})
    values["pretrained.freeze_backbone"] = params.pretrained.freeze_backbone
    values["precision"] = precision
    off = LOGGING_ONLY + NAMES_OF_INPUTS + (VALIDATION if params.training.keep != "best" else ())
    return {k: v for k, v in values.items() if k not in off}


def input_digests(directory: Path, files: tuple[str, ...] | None) -> dict[str, str]:
    names = files if files is not None else sorted(p.name for p in directory.iterdir() if p.is_file())
    return {name: file_digest(directory / name) for name in names}


def fingerprint(params: Params, precision: str, inputs: Mapping[str, Path]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed, part by part; ``inputs`` maps each
    name of ``INPUTS`` that the run reads to its directory."""
    return {"params": trajectory_params(params, precision), "code": code_digest(),
            "inputs": {name: input_digests(Path(directory), INPUTS[name][1]) for name, directory in inputs.items()}}


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    reasons = []
    old, new = flatten(saved.get("params", {})), flatten(current["params"])
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        reasons.append("params differ (" + "; ".join(changed[:5]) + (", ..." if len(changed) > 5 else "") + ")")
    if saved.get("code") != current["code"]:
        reasons.append("the code in src/samba differs")
    for name, digests in current["inputs"].items():
        if saved.get("inputs", {}).get(name) != digests:
            reasons.append(f"{INPUTS[name][0]} differ")
    return reasons


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file, then a rename."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def set_aside(path: Path, step: int | None) -> Path:
    """Rename the checkpoint ``path`` (and the best weights beside it) to a name of its own:
    ``other-run-<when>-step<N>.pt``, or ``unreadable-<when>.pt``; <when> is its mtime, and a
    -2, -3, ... suffix keeps every earlier one."""
    when = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    stem = f"other-run-{when}-step{step}" if step is not None else f"unreadable-{when}"
    n, name = 1, stem
    while any(path.with_name(name + s).exists() for s in (".pt", "-" + BEST_FILE)):
        n += 1
        name = f"{stem}-{n}"
    best = path.with_name(BEST_FILE)
    if best.is_file():
        os.rename(best, path.with_name(f"{name}-{BEST_FILE}"))
    os.rename(path, path.with_name(name + ".pt"))
    return path.with_name(name + ".pt")


def load(path: Path, current: dict[str, Any], may_set_aside: bool = True) -> dict[str, Any] | None:
    """The saved state if ``path`` exists and was written by a run on this trajectory; else
    None. A checkpoint of another run, or an unreadable one, is set aside (``set_aside``,
    when ``may_set_aside``: one process of several does it) and the log says where."""
    if not path.is_file():
        return None
    step = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        reasons, step = differences(state.get("fingerprint", {}), current), state.get("step")
        if not reasons:
            return state
        why = f"was written by another run: {'; '.join(reasons)}"
    except FileNotFoundError:  # set aside by another process meanwhile
        return None
    except Exception as err:
        why = f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if may_set_aside:
        kept = set_aside(path, step)
        logger.warning("%s %s; set aside as %s; this run starts from step 0", path, why, kept)
    return None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping what belongs to this optimizer rather
    than to the one that saved: its implementation flags (fused, capturable, ...: the
    checkpoint may come from the CPU or from a run without CUDA graphs), and each tensor-valued
    hyperparameter as the very tensor it was made with, the loaded value copied in.
    ``load_state_dict`` alone replaces the device tensor of the learning rate, which a captured
    CUDA-graph step reads, with the checkpoint's CPU copy: the captured step then keeps the
    value of the resume for the rest of the run."""
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    groups = [{**g, **{k: mine[k] for k in OPTIMIZER_IMPLEMENTATION if k in mine}}
              for g, mine in zip(saved["param_groups"], own)]
    optimizer.load_state_dict({**saved, "param_groups": groups})  # state placed as this optimizer wants
    for group, mine in zip(optimizer.param_groups, own):
        for key, value in mine.items():
            loaded = group[key]
            if isinstance(value, torch.Tensor):
                with torch.no_grad():
                    value.copy_(torch.as_tensor(loaded, dtype=value.dtype))
                group[key] = value
            elif isinstance(loaded, torch.Tensor):  # a tensor saved where this optimizer has a number
                group[key] = loaded.item()


class Checkpointer:
    """One run's training checkpoints in ``directory``: ``last.pt`` (``resume``, ``save``), the
    keep-best weights (``keep_best``, ``restore_best``) and the live metrics directory, which
    ``complete`` publishes before clearing the rest. Only the main process writes."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], keep_best: bool, is_main: bool):
        self.path, self.best_path = directory / CHECKPOINT_FILE, directory / BEST_FILE
        self.live_dir = directory / LIVE_DIR  # the metrics directory's content until the run completes
        self.fingerprint, self.keeps_best, self.is_main = fingerprint, keep_best, is_main
        self.best: dict[str, Any] | None = None  # {"step", "val_ppl"} of the weights in best_path

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Load this run's checkpoint (``load``) into ``model`` and ``optimizer``; return what
        else it holds (step, history, wandb_id, window), or None: the run starts afresh."""
        state = load(self.path, self.fingerprint, may_set_aside=self.is_main)
        if state is None:
            return None
        model.load_state_dict(state.pop("model"))
        load_optimizer_state(optimizer, state.pop("optimizer"))
        self.best = state["best"]
        return state

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, log,
             window: dict[str, Any]) -> None:
        """Write the state after ``step`` completed steps: the weights, the optimizer, the logged
        rows and W&B id of ``log`` (a ``tracking.MetricsLogger``), the keep-best record and the
        log ``window`` (``tracking.LogWindow.state``)."""
        if self.is_main:  # the module's save: atomic
            save(self.path, {"step": step, "fingerprint": self.fingerprint, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "history": log.rows if log else [],
                             "best": self.best, "wandb_id": log.wandb_id if log else None, "window": window})

    def keep_best(self, step: int, val_ppl: float, model) -> None:
        """With training.keep: best, save the weights of the lowest validation ppl among the
        validations that ran at model.sparsity_target (after the ramp; on the rank that validates)."""
        if not self.keeps_best or model.sparsity_value < model.config.sparsity_target:
            return
        if self.best is None or val_ppl < self.best["val_ppl"]:
            with atomic_file(self.best_path) as tmp:
                save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
            self.best = {"step": step, "val_ppl": val_ppl}

    def restore_best(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any] | None:
        """With training.keep: best, load the best weights into ``model`` and return their record;
        None where the last weights stay (keep: last, or no validation ran at the target)."""
        if not self.keeps_best:
            return None
        if self.best is None:
            logger.warning("training.keep: best, but no validation ran at model.sparsity_target (after "
                           "the sparsity ramp); keeping the last weights")
            return None
        model.load_state_dict(load_file(self.best_path, device=str(device)), strict=False)
        logger.info("keeping the weights of step %d (validation ppl %.3f)", self.best["step"], self.best["val_ppl"])
        return self.best

    def complete(self, metrics_dir: Path) -> None:
        """The run completed: its metrics replace ``metrics_dir`` whole; the checkpoint, the best
        weights and the live metrics go."""
        with atomic_dir(metrics_dir) as tmp:  # whole, or the earlier run's as it was
            shutil.copytree(self.live_dir, tmp, dirs_exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.best_path.unlink(missing_ok=True)
        shutil.rmtree(self.live_dir, ignore_errors=True)
