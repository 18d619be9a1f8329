"""Distillation from a frozen teacher: the teacher itself, and the term that pulls the student
towards it.

    total = CE(main) + distill_weight * KL(teacher || student) + readout and penalty terms (loss.py)

``distill``: per token, KL(p_teacher || p_student) of the main heads' next-token distributions,
in nats, averaged over tokens (Hinton et al. 2015, at temperature 1). Computed slice by slice
(``ops.linear_kl_divergence``): neither model's (tokens x vocabulary) logits exist in full.

A second term was tried and removed: a normalised MSE between each chunk output (before top-k)
and the teacher's. On the H200 sweep it made top-k 0.9 + KL 10 worse (+4.5% over the best dense
control against +2.1% without it; benchmarks/results/2026-11-30/sparsity_sweep/README.md).

The teacher (``training.teacher``) is any model directory ``Samba.from_pretrained`` reads: the
converted baseline (``models/init``, the default), a Samba directory written by ``train`` (a
dense control copied aside), or a transformers / mamba-ssm checkpoint. It runs in eval mode
without gradients, inside the training step (and its CUDA graph), on the same batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .data import TOKENIZER_FILE, load_tokenizer
from .model import Samba
from .model_files import SAMBA_FORMAT, CheckpointError, detect_format, read_config
from .paths import resolve_local_path

PART_NAMES = ("distill",)


class Teacher:
    """A frozen model: ``teacher(input_ids)`` -> its main head's input (B, L, d_model), no grad.

    A plain object, not a module: it is not the student's parameter, buffer or state, and
    DistributedDataParallel around the objective never sees it."""

    def __init__(self, model: Samba, path: Path | None = None):
        self.model = model.eval().requires_grad_(False)
        self.path = path  # the directory it was loaded from: its files are part of a run's fingerprint

    @classmethod
    def load(cls, path: str | Path, student: ModelConfig, backend: str, device: torch.device,
             tokenizer: Path | None = None) -> "Teacher":
        """The model in ``path``, checked against the student: the same vocabulary (the KL compares
        next-token distributions), and, where the teacher records its tokenizer, the same tokens
        as ``tokenizer`` (the student's data's): a vocabulary of the same size can still mean
        other tokens."""
        path = require_teacher(path)
        if tokenizer is not None and (path / TOKENIZER_FILE).is_file() and tokenizer.is_file():
            if load_tokenizer(str(path / TOKENIZER_FILE)).get_vocab() != load_tokenizer(str(tokenizer)).get_vocab():
                raise ConfigError(f"training.teacher: {path} records another tokenizer than the data's ({tokenizer}); "
                                  "the KL compares distributions over the same tokens")
        overrides = {}
        if detect_format(read_config(path), path) != SAMBA_FORMAT:  # Mamba says nothing of a readout
            overrides = {"readout_stride": student.readout_stride, "readout_hidden_dim": student.readout_hidden_dim}
        model = Samba.from_pretrained(path, backend=backend, device=device, **overrides)
        c = model.config
        if c.vocab_size != student.vocab_size:
            raise ConfigError(f"training.teacher: {path} has a vocabulary of {c.vocab_size}, the student "
                              f"{student.vocab_size}; the KL compares distributions over one vocabulary")
        return cls(model.to(device), path)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.final_hidden(self.model.chunk_outputs(input_ids))


def distilling(training) -> bool:
    """Whether ``training`` (the TrainingConfig) asks for a teacher."""
    return training.distill_weight > 0


def require_teacher(path: str | Path) -> Path:
    """``training.teacher`` must be a model directory (checked before any work); a relative one
    read as ``paths.resolve_local_path`` says. Returns the directory."""
    path = resolve_local_path(str(path))
    if not path.is_dir():
        raise CheckpointError(f"training.teacher: {path} is not a directory (a model directory: "
                              "models/init for the baseline, a Samba directory, or a Mamba checkpoint)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"training.teacher: {path} holds no config.json; not a model directory")
    return path
