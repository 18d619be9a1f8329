"""The Samba training objective.

    loss = CE(main head) + readout_weight * CE(readout head) + pruning_weight * penalty(chunk outputs)
           [+ distill_weight * KL(teacher || student), with a teacher]

``penalty`` is ``training.pruning_penalty`` (``sparsity.PENALTIES``: the seed's mean|x|, or the
scale-free Hoyer ratio), taken on the chunk outputs before any top-k zeroing, so that it pushes
the entries top-k would drop towards 0. Both cross-entropies go through
``linear_cross_entropy`` so neither head's logits are ever stored in full. A term whose weight
is 0 adds nothing; it is still computed (without gradient) for reporting when ``report_all``.
The distillation term (``distill.py``) exists only with a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import distill
from .model import Samba
from .ops import linear_cross_entropy, linear_kl_divergence
from .sparsity import PENALTIES

PART_NAMES = ("loss", "main_ce", "readout_ce", "penalty")  # what every run reports


@dataclass
class LossParts:
    total: torch.Tensor  # what backward() is called on
    main_ce: torch.Tensor
    readout_ce: torch.Tensor | None
    penalty: torch.Tensor | None
    distill: torch.Tensor | None = None

    def values(self, names: tuple[str, ...] = PART_NAMES) -> torch.Tensor:
        """The parts ``names`` ('loss' is the total) as one detached fp32 tensor (0 where not computed)."""
        zero = self.main_ce.new_zeros(())
        parts = [self.total if n == "loss" else getattr(self, n) for n in names]
        return torch.stack([v.detach().float() if v is not None else zero for v in parts])


def readout_head_ce(model: Samba, chunk_outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the readout head, from the chunk outputs."""
    return linear_cross_entropy(model.readout.features(chunk_outputs), model.readout.head.weight,
                                targets, compiled=model.compiled)


def samba_loss(model: Samba, input_ids: torch.Tensor, targets: torch.Tensor, readout_weight: float,
               pruning_weight: float, penalty: str = "l1", report_all: bool = True,
               teacher: distill.Teacher | None = None, distill_weight: float = 0.0) -> LossParts:
    """input_ids, targets: (B, L); targets[b, t] is the token after input_ids[b, t]."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {penalty!r}")
    grad = torch.is_grad_enabled()
    chunk_outputs, dense = model.chunk_outputs(input_ids, return_dense=True)
    hidden = model.final_hidden(chunk_outputs)
    main_ce = linear_cross_entropy(hidden, model.lm_head_weight, targets, compiled=model.compiled)
    readout_ce = pen = kl = None
    if readout_weight > 0 or report_all:
        with torch.set_grad_enabled(grad and readout_weight > 0):
            readout_ce = readout_head_ce(model, chunk_outputs, targets)
    if pruning_weight > 0 or report_all:
        with torch.set_grad_enabled(grad and pruning_weight > 0):
            pen = PENALTIES[penalty](dense)
    if teacher is not None:
        with torch.set_grad_enabled(grad and distill_weight > 0):
            kl = linear_kl_divergence(hidden, model.lm_head_weight, teacher(input_ids), teacher.head_weight,
                                      compiled=model.compiled)
    total = main_ce
    for weight, term in ((readout_weight, readout_ce), (pruning_weight, pen), (distill_weight, kl)):
        if weight > 0:
            total = total + weight * term
    return LossParts(total=total, main_ce=main_ce, readout_ce=readout_ce, penalty=pen, distill=kl)


class SambaObjective(nn.Module):
    """The loss as a module (what DistributedDataParallel wraps: it must see a forward call).

    forward(inputs, targets) -> the total with its graph for backward, and the parts
    ``part_names`` as one fp32 tensor (PART_NAMES, plus the distillation term with a teacher;
    0 where a part is not computed). ``report_all`` as in ``samba_loss``.
    """

    def __init__(self, model: Samba, readout_weight: float, pruning_weight: float, penalty: str,
                 report_all: bool = True, teacher: distill.Teacher | None = None, distill_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.readout_weight, self.pruning_weight, self.penalty = readout_weight, pruning_weight, penalty
        self.report_all = report_all
        self.teacher, self.distill_weight = teacher, distill_weight
        self.part_names = PART_NAMES + (distill.PART_NAMES if teacher is not None else ())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor):
        parts = samba_loss(self.model, input_ids, targets, self.readout_weight, self.pruning_weight,
                           self.penalty, self.report_all, self.teacher, self.distill_weight)
        return parts.total, parts.values(self.part_names)
