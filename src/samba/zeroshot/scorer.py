"""log P(continuation | context) for lm-eval's token-level requests, batched by shape.

Requests are bucketed by padded length (powers of two up to ``max_length``) and continuation
length, and each bucket's batches have one shape, so on CUDA a batch is one replayed CUDA graph
(``cuda_graphs.GraphedCallable``). Only the continuation's positions reach the vocabulary
projection, through ``ops.linear_token_logprobs``: the (batch x length x vocab) logits are never
built.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cuda_graphs import GraphedCallable, graphs_wanted
from ..model import Samba
from ..ops import linear_token_logprobs
from ..runtime import autocast
from .errors import ZeroShotError


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded sizes: powers of two from ``smallest``, then ``max_length``."""
    sizes = [smallest]
    while sizes[-1] * 2 < max_length:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_length})


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class Scorer:
    """log P(continuation | context) for token lists, batched by shape.

    ``head``'s vectors are taken only at the scored positions (the last ``len(continuation)``
    inputs of each row); rows are right-padded, which the causal model never sees."""

    def __init__(self, model: Samba, head: str, dtype: torch.dtype | None, graphs: bool, batch_size: int,
                 batch_tokens: int, max_length: int):
        self.model, self.head, self.dtype, self.graphs = model, head, dtype, graphs
        self.batch_size, self.batch_tokens, self.max_length = batch_size, batch_tokens, max_length
        self.lengths = length_buckets(max_length)  # of a row
        self.widths = length_buckets(max_length, smallest=1)  # scored positions of a row
        self.device = model.embedding.weight.device

    def rows(self, length: int, available: int) -> int:
        rows = max(1, self.batch_tokens // length) if self.batch_tokens > 0 else self.batch_size
        return min(rows, available)

    def _batch_fn(self, rows: int, width: int):
        model, head = self.model, self.head

        def batch(inputs: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
            # inputs (R, L); positions, targets, mask (R * W,): W slots a row, flat indices into R * L
            with autocast(inputs.device, self.dtype, cache=False):
                outputs = model.chunk_outputs(inputs)  # n_chunks x (R, L, D)
                if head == "main":
                    last = outputs[-1].reshape(-1, outputs[-1].shape[-1])[positions]
                    hidden, weight = model.final_hidden([last]), model.lm_head_weight
                else:
                    picked = [o.reshape(-1, o.shape[-1])[positions] for o in outputs]
                    hidden, weight = model.readout.features(picked), model.readout.head.weight
                logprob, hit = linear_token_logprobs(hidden, weight, targets)
            total = (logprob.double() * mask).view(rows, width).sum(1)
            greedy = (hit | ~mask).view(rows, width).all(1)
            return torch.stack([total, greedy.double()], dim=1)  # (R, 2)
        return batch

    def _pack(self, items, rows: int, length: int, width: int):
        """Host arrays of one batch: items are (index, input ids, continuation ids)."""
        inputs = np.zeros((rows, length), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        targets = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=bool)
        for r, (_, inp, cont) in enumerate(items):
            n, m = len(inp), len(cont)
            inputs[r, :n] = inp
            positions[r, :m] = r * length + np.arange(n - m, n)
            targets[r, :m] = cont
            mask[r, :m] = True
        index = np.array([i for i, _, _ in items], dtype=np.int64)
        return [torch.from_numpy(a) for a in (inputs, positions.ravel(), targets.ravel(), mask.ravel(), index)]

    def _to_device(self, arrays: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host memory, so that the copies do not wait for the GPU to finish its queue."""
        if self.device.type != "cuda":
            return arrays
        return [a.pin_memory().to(self.device, non_blocking=True) for a in arrays]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], desc: str | None = None) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (sum of log-probabilities, greedy) each."""
        groups = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            if not continuation or len(continuation) > self.max_length:
                raise ZeroShotError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                    f"max_length {self.max_length}")
            if not context:  # else the first token is scored from flat position r * length - 1, not this row's
                raise ZeroShotError("an empty context gives the continuation's first token nothing to be "
                                    "predicted from: put the end-of-text token there, as lm-eval does")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            inp = tokens[:-1]  # left-truncated to max_length, as lm-eval's transformers backend does
            groups[bucket(len(inp), self.lengths), bucket(len(continuation), self.widths)].append(
                (i, inp, list(continuation)))
        out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.device)
        progress = tqdm(total=len(pairs), desc=desc, disable=desc is None, leave=False)
        self.model.eval()
        for (length, width), items in sorted(groups.items(), reverse=True):  # longest first, as lm-eval does
            items.sort(key=lambda item: -len(item[1]))
            rows = self.rows(length, len(items))
            step = GraphedCallable(self._batch_fn(rows, width), enabled=graphs_wanted(self.graphs, self.device),
                                   warmup=2, name=f"loglikelihood batch {rows} x {length}")
            for start in range(0, len(items), rows):
                chunk = items[start:start + rows]
                *batch, index = self._to_device(self._pack(chunk, rows, length, width))
                out[index] = step(*batch)[:len(chunk)]  # stays on the device: no wait per batch
                progress.update(len(chunk))
            step.release()
        progress.close()
        return [(total, greedy > 0.5) for total, greedy in out.tolist()]
