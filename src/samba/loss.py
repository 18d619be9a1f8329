"""The Samba training objective.

    loss = CE(main head) + readout_weight * CE(readout head) + pruning_weight * mean|chunk outputs|

Both cross-entropies go through ``linear_cross_entropy`` so neither head's logits are ever
stored in full. A term whose weight is 0 adds nothing; it is still computed (without
gradient) for reporting when ``report_all`` is set, and is None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Samba
from .ops import linear_cross_entropy


@dataclass
class LossParts:
    total: torch.Tensor  # what backward() is called on
    main_ce: torch.Tensor
    readout_ce: torch.Tensor | None
    l1: torch.Tensor | None  # mean |x| over every chunk output element

    def detached(self) -> dict[str, torch.Tensor]:
        parts = {"loss": self.total, "main_ce": self.main_ce, "readout_ce": self.readout_ce, "l1": self.l1}
        return {k: v.detach() for k, v in parts.items() if v is not None}


def main_head_ce(model: Samba, chunk_outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the main (tied) head, from the chunk outputs."""
    return linear_cross_entropy(model.final_hidden(chunk_outputs), model.lm_head_weight, targets,
                                compiled=model.compiled)


def readout_head_ce(model: Samba, chunk_outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of the readout head, from the chunk outputs."""
    return linear_cross_entropy(model.readout.features(chunk_outputs), model.readout.head.weight,
                                targets, compiled=model.compiled)


def chunk_l1(chunk_outputs) -> torch.Tensor:
    """mean |x| over all chunks, positions and features (chunks have equal shapes)."""
    return torch.stack([c.abs().mean() for c in chunk_outputs]).mean()


def samba_loss(model: Samba, input_ids: torch.Tensor, targets: torch.Tensor,
               readout_weight: float, pruning_weight: float, report_all: bool = True) -> LossParts:
    """input_ids, targets: (B, L); targets[b, t] is the token after input_ids[b, t]."""
    chunk_outputs = model.chunk_outputs(input_ids)
    main_ce = main_head_ce(model, chunk_outputs, targets)
    readout_ce = l1 = None
    if readout_weight > 0 or report_all:
        with torch.set_grad_enabled(torch.is_grad_enabled() and readout_weight > 0):
            readout_ce = readout_head_ce(model, chunk_outputs, targets)
    if pruning_weight > 0 or report_all:
        with torch.set_grad_enabled(torch.is_grad_enabled() and pruning_weight > 0):
            l1 = chunk_l1(chunk_outputs)
    total = main_ce
    if readout_weight > 0:
        total = total + readout_weight * readout_ce
    if pruning_weight > 0:
        total = total + pruning_weight * l1
    return LossParts(total=total, main_ce=main_ce, readout_ce=readout_ce, l1=l1)
