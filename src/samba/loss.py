"""The Samba training objective.

    loss = CE(main head) + readout_weight * CE(readout head) + pruning_weight * penalty(chunk outputs)

``penalty`` is ``training.pruning_penalty`` (``sparsity.PENALTIES``: the seed's mean|x|, or the
scale-free Hoyer ratio), taken on the chunk outputs before any top-k zeroing, so that it pushes
the entries top-k would drop towards 0. Both cross-entropies go through
``linear_cross_entropy`` so neither head's logits are ever stored in full. A term whose weight
is 0 adds nothing; it is still computed (without gradient) for reporting when ``report_all``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .model import Samba
from .ops import linear_cross_entropy
from .sparsity import PENALTIES

PART_NAMES = ("loss", "main_ce", "readout_ce", "penalty")


@dataclass
class LossParts:
    total: torch.Tensor  # what backward() is called on
    main_ce: torch.Tensor
    readout_ce: torch.Tensor | None
    penalty: torch.Tensor | None

    def values(self) -> torch.Tensor:
        """The parts, in PART_NAMES order, as one detached (4,) fp32 tensor (0 where not computed)."""
        zero = self.main_ce.new_zeros(())
        return torch.stack([v.detach().float() if v is not None else zero
                            for v in (self.total, self.main_ce, self.readout_ce, self.penalty)])


def main_head_ce(model: Samba, chunk_outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the main (tied) head, from the chunk outputs."""
    return linear_cross_entropy(model.final_hidden(chunk_outputs), model.lm_head_weight, targets,
                                compiled=model.compiled)


def readout_head_ce(model: Samba, chunk_outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the readout head, from the chunk outputs."""
    return linear_cross_entropy(model.readout.features(chunk_outputs), model.readout.head.weight,
                                targets, compiled=model.compiled)


def samba_loss(model: Samba, input_ids: torch.Tensor, targets: torch.Tensor, readout_weight: float,
               pruning_weight: float, penalty: str = "l1", report_all: bool = True) -> LossParts:
    """input_ids, targets: (B, L); targets[b, t] is the token after input_ids[b, t]."""
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {penalty!r}")
    chunk_outputs, dense = model.chunk_outputs(input_ids, return_dense=True)
    main_ce = main_head_ce(model, chunk_outputs, targets)
    readout_ce = pen = None
    if readout_weight > 0 or report_all:
        with torch.set_grad_enabled(torch.is_grad_enabled() and readout_weight > 0):
            readout_ce = readout_head_ce(model, chunk_outputs, targets)
    if pruning_weight > 0 or report_all:
        with torch.set_grad_enabled(torch.is_grad_enabled() and pruning_weight > 0):
            pen = PENALTIES[penalty](dense)
    total = main_ce
    if readout_weight > 0:
        total = total + readout_weight * readout_ce
    if pruning_weight > 0:
        total = total + pruning_weight * pen
    return LossParts(total=total, main_ce=main_ce, readout_ce=readout_ce, penalty=pen)


class SambaObjective(nn.Module):
    """The loss as a module (what DistributedDataParallel wraps: it must see a forward call).

    forward(inputs, targets) -> a (4,) fp32 tensor: total, main CE, readout CE, penalty
    (0 where a part is not computed), plus the total with its graph for backward.
    ``report_all`` as in ``samba_loss``.
    """

    def __init__(self, model: Samba, readout_weight: float, pruning_weight: float, penalty: str,
                 report_all: bool = True):
        super().__init__()
        self.model = model
        self.readout_weight, self.pruning_weight, self.penalty = readout_weight, pruning_weight, penalty
        self.report_all = report_all

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor):
        parts = samba_loss(self.model, input_ids, targets, self.readout_weight, self.pruning_weight,
                           self.penalty, self.report_all)
        return parts.total, parts.values()
